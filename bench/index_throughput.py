"""Indexing throughput: images/s of `mmsearch index` end to end vs the model alone.

Both are measured in the same run on the same machine: first the model-only
rate of the encoder on already-preprocessed tensors at the indexing batch
size, then `python -m mmsearch index` (a fresh process: start-up, model load,
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
see mmsearch.encode.share_cores_with_decoding); an empty OMP_WAIT_POLICY
keeps OpenMP's own default, which spins.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from _common import CACHE, ROOT, Timer, machine, make_photos, table, vit_b32_dir


def model_only(model_dir, batch: int, batches: int) -> tuple[float, float, float]:
    """(images/s of embed_images on preprocessed tensors, CPU seconds per image, model load seconds)."""
    import torch

    from mmsearch.encode import load_encoder

    with Timer() as load:
        encoder = load_encoder(f"local-dir:{model_dir}", "cpu")
    pixels = torch.randn(batch, 3, encoder.image_size, encoder.image_size)
    encoder.embed_images(pixels)  # warm up
    cpu0 = time.process_time()
    with Timer() as t:
        for _ in range(batches):
            encoder.embed_images(pixels)
    cpu = time.process_time() - cpu0
    return batch * batches / t.seconds, cpu / (batch * batches), load.seconds


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

    batches = max(3, min(8, args.photos // args.batch_size))
    ceiling, cpu_per_img, load_s = model_only(model_dir, args.batch_size, batches)
    headers = ["run", "time", "img/s", "ratio", "CPU s/img", "CPU ratio", "pipeline s"]
    rows = [["model only (preprocessed tensors)", f"batch {args.batch_size}", f"{ceiling:.2f}", "1.00",
             f"{cpu_per_img:.3f}", "1.00", ""]]
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
    print(f"KEY: end-to-end / model-only = {ratios[0]:.2f} wall, {cpu_ratios[0]:.2f} CPU "
          f"(target >= 0.9; {args.photos} photos, start-up included)")


if __name__ == "__main__":
    main()
