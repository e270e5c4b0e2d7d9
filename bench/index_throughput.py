"""Indexing throughput: images/s of `mmsearch index` end to end vs the model alone.

Both are measured in the same run on the same machine: first the model-only
rate of the encoder on already-preprocessed tensors at the indexing batch
size (one model on all threads, and one per lane as `index` runs it on the
CPU; the faster is the ceiling), then the CPU cost of decoding one photo
alone, then `python -m mmsearch index` (a fresh process: start-up, model load,
read, hash, decode, encode, catalog and FAISS writes) over a folder of
photo-like 3000x2000 JPEGs (~1.7 MB each, generated once and cached).

The model is open_clip's ViT-B-32 architecture with random weights (speed
does not depend on the weights), saved in local-dir layout.

    python bench/index_throughput.py                 # 1,000 photos (~3 min once generated)
    python bench/index_throughput.py --photos 200    # quick
    python bench/index_throughput.py --photos 300 --configs "workers=2 workers=1 workers=0"
    python bench/index_throughput.py --photos 400 --configs "default env:OMP_WAIT_POLICY="   # vs OpenMP's spinning default
    python bench/index_throughput.py --photos 400 --configs "default int8=1"   # the opt-in int8 image tower

`mmsearch index` makes idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE,
see mmsearch.runtime.share_cores_with_decoding); an empty OMP_WAIT_POLICY
keeps OpenMP's own default, which spins.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from _common import CACHE, ROOT, Timer, machine, make_photos, table, vit_b32_dir


def model_only(model_dir, batch: int, batches: int, rounds: int = 3) -> tuple[dict[str, tuple[float, float]], float]:
    """Model-only rates on preprocessed tensors: {run: (images/s, CPU seconds per image)}, and model load seconds.

    Measured both ways the machine can run the model, alternating ``rounds``
    times (medians): one model on all torch threads, and one model per lane on
    a share of the threads (as `index` runs on the CPU); the ceiling is the
    faster of the two.
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from mmsearch.encode import load_encoder
    from mmsearch.runtime import cpu_count, set_torch_threads, threads_for_lanes

    with Timer() as load:
        encoder = load_encoder(f"local-dir:{model_dir}", "cpu")
    pixels = torch.randn(batch, 3, encoder.image_size, encoder.image_size)
    encoder.embed_images(pixels)  # warm up
    def one_model() -> tuple[float, float]:
        cpu0 = time.process_time()
        with Timer() as t:
            for _ in range(batches):
                encoder.embed_images(pixels)
        return batch * batches / t.seconds, (time.process_time() - cpu0) / (batch * batches)

    def in_lanes(pool: ThreadPoolExecutor, lanes: int) -> tuple[float, float]:
        per_lane = max(1, batches // lanes)
        cpu0 = time.process_time()
        with Timer() as t:
            list(pool.map(lambda _: [encoder.embed_images(pixels) for _ in range(per_lane)], range(lanes)))
        n = batch * per_lane * lanes
        return n / t.seconds, (time.process_time() - cpu0) / n

    threads = torch.get_num_threads()
    samples: dict[str, list[tuple[float, float]]] = {}
    for _ in range(rounds):  # alternating, so a noisy moment does not favour one way
        samples.setdefault(f"{threads} threads", []).append(one_model())
        lanes = cpu_count()
        per_lane = threads_for_lanes(lanes)  # the lanes' threads take this count on first use
        with ThreadPoolExecutor(lanes) as pool:
            list(pool.map(lambda _: encoder.embed_images(pixels), range(lanes)))  # warm up each lane
            name = f"{lanes} lanes x {per_lane} thread(s)"
            samples.setdefault(name, []).append(in_lanes(pool, lanes))
        set_torch_threads(threads)
    out = {name: (statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs))
           for name, runs in samples.items()}
    return out, load.seconds


def decode_cost(photos, count: int, image_size: int) -> float:
    """CPU seconds per photo to read, hash, decode (at reduced scale) and resize, on one thread."""
    from open_clip.transform import image_transform

    from mmsearch.decode import decode_file
    from mmsearch.discover import FileEntry
    from mmsearch.preprocess import split_preprocess

    per_image = split_preprocess(image_transform(image_size, is_train=False)).per_image
    files = sorted(photos.glob("*.jpg"))[:count]
    entries = [FileEntry(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    decode_file(entries[0], per_image, image_size)  # warm up
    cpu0 = time.process_time()
    for entry in entries:
        decode_file(entry, per_image, image_size)
    return (time.process_time() - cpu0) / len(entries)


def end_to_end(model_dir, photos, env_extra: dict[str, str], args: list[str]) -> tuple[float, float, dict]:
    """Wall and CPU seconds of `python -m mmsearch index` in a fresh process, and its JSON report."""
    home = tempfile.mkdtemp(prefix="mmsearch-bench-home-")
    env = {**os.environ, "PYTHONPATH": str(ROOT), **env_extra}
    try:
        cmd = [sys.executable, "-m", "mmsearch", "--home", home, "--model", f"local-dir:{model_dir}", *args,
               "index", str(photos), "--json", "--quiet"]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=1000, help="how many 3000x2000 JPEGs to index")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--configs", default="default",
                    help="space-separated runs: 'default', or comma lists of workers=N, threads=N (OMP_NUM_THREADS), int8=1, env:VAR=V")
    args = ap.parse_args()

    print(machine())
    model_dir = vit_b32_dir()
    all_photos = make_photos(CACHE / "photos-1000", max(args.photos, 1))
    photos = CACHE / f"photos-{args.photos}"
    if photos != all_photos:  # a folder holding just the first N (symlinks)
        photos.mkdir(exist_ok=True)
        for i in range(args.photos):
            link = photos / f"photo_{i:05d}.jpg"
            if not link.exists():
                link.symlink_to(all_photos / f"photo_{i:05d}.jpg")
    mb = sum(os.path.getsize(photos / f"photo_{i:05d}.jpg") for i in range(args.photos)) / args.photos / 2**20
    print(f"data: {args.photos} photo-like JPEGs, 3000x2000, {mb:.2f} MB each on average")

    batches = 4
    runs, load_s = model_only(model_dir, args.batch_size, batches)
    best = max(runs, key=lambda name: runs[name][0])
    ceiling, cpu_per_img = runs[best]
    decode_s = decode_cost(photos, min(64, args.photos), 224)
    headers = ["run", "time", "img/s", "ratio", "CPU s/img", "CPU ratio", "pipeline s"]
    rows = [[f"model only, {name} (preprocessed tensors)", f"batch {args.batch_size}", f"{rate:.2f}",
             f"{rate / ceiling:.2f}", f"{cpu:.3f}", f"{cpu_per_img / cpu:.2f}", ""] for name, (rate, cpu) in runs.items()]
    rows.append(["read + hash + decode + resize alone, 1 thread", "", f"{1 / decode_s:.2f}", "", f"{decode_s:.3f}", "", ""])
    ratios, cpu_ratios = [], []
    for config in args.configs.split():
        env_extra, cli = {}, ["--batch-size", str(args.batch_size)]
        if config != "default":
            for part in config.split(","):
                key, value = part.split("=", 1)
                if key == "workers":
                    cli += ["--workers", value]
                elif key == "int8":
                    cli += ["--int8"] if value == "1" else []
                elif key == "threads":
                    env_extra["OMP_NUM_THREADS"] = value
                elif key.startswith("env:"):
                    env_extra[key[4:]] = value
        wall, cpu, report = end_to_end(model_dir, photos, env_extra, cli)
        assert report["added"] == args.photos, report
        rate = args.photos / wall
        ratios.append(rate / ceiling)
        cpu_ratios.append(cpu_per_img / (cpu / args.photos))
        rows.append([f"mmsearch index ({config})", f"{wall:.1f} s wall", f"{rate:.2f}", f"{rate / ceiling:.2f}",
                     f"{cpu / args.photos:.3f}", f"{cpu_ratios[-1]:.2f}", f"{report['seconds']:.1f}"])
        print(table(headers, rows), flush=True)
    print(f"(model load in-process: {load_s:.1f} s; 'pipeline s' = the index report's own seconds, which include the"
          " model load but not interpreter start-up and imports; 'CPU ratio' = model-only CPU per image / end-to-end"
          " CPU per image, start-up included, which shared-machine noise disturbs far less than wall time)")
    try:
        load = os.getloadavg()[0]
        print(f"load average at the end: {load:.1f} on {os.cpu_count()} cores (above the core count = other work ran too)")
    except OSError:
        pass
    bound = cpu_per_img / (cpu_per_img + decode_s)
    print(f"ceiling: the model-only rate is the faster model-only run ({best}); with the model's {cpu_per_img * 1000:.0f} ms"
          f" and the decode's {decode_s * 1000:.0f} ms of CPU per photo, no pipeline that decodes these files on these"
          f" cores can pass {bound:.2f} of it")
    one = next(iter(runs))  # one model on all threads, how the model runs outside `index`
    print(f"KEY: end-to-end / model-only = {ratios[0]:.2f} wall, {cpu_ratios[0]:.2f} CPU "
          f"(target >= 0.9; decode-bound ceiling {bound:.2f}; against {one}: {ratios[0] * ceiling / runs[one][0]:.2f} wall;"
          f" {args.photos} photos, start-up included)")


if __name__ == "__main__":
    main()
