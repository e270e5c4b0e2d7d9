"""The overhead of Ray: the same folder through `mmsearch index --ray` and a plain `mmsearch index`.

Each run is a fresh process on a fresh home; the ``--ray`` one starts a local
Ray cluster on this machine (all its cores). Throughput is taken from the
run's own timing (``seconds`` of ``--json``: after the cluster is up, so
Ray's start-up is excluded, but the actors' model loads are included) and,
to take model loads out as well, from the difference between a run of
``--photos`` images and one of half as many. Runs alternate, ``--rounds``
times; medians are reported. The catalogs of the two kinds of run are then
compared: the same files, the same vectors.

    python bench/ray_index.py --photos 600 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from _common import CACHE, ROOT, machine, make_photos, table, vit_b32_dir


def run(home: Path, model: Path, folder: Path, ray: bool) -> dict:
    cmd = [sys.executable, "-m", "mmsearch", "--home", str(home), "--model", f"local-dir:{model}",
           "index", str(folder), "--json", "--quiet"] + (["--ray"] if ray else [])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster, on this machine
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def vectors(home: Path) -> dict[str, bytes]:
    with sqlite3.connect(home / "catalog.sqlite3") as db:
        return {Path(p).name: v for p, v in db.execute("select path, vector from images")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=600, help="photos in the folder (half as many for the second size)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of plain and --ray runs")
    ap.add_argument("--size", default="1500x1000", help="photo size, WxH")
    args = ap.parse_args()
    print(machine())
    w, h = (int(x) for x in args.size.split("x"))
    cache = make_photos(CACHE / f"ray-photos-{args.size}", args.photos, (w, h))
    photos = sorted(cache.glob("*.jpg"))[: args.photos]

    def subset(n: int) -> Path:  # the first n photos of the cache, as links
        folder = CACHE / f"ray-photos-{args.size}-first-{n}"
        if not folder.exists():
            folder.mkdir(parents=True)
            for p in photos[:n]:
                os.link(p, folder / p.name)
        return folder

    full, half = subset(args.photos), subset(args.photos // 2)
    model = vit_b32_dir()
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    seconds: dict[tuple[str, int], list[float]] = {}
    try:
        for r in range(args.rounds):
            for how in ("plain", "ray"):
                for folder, n in ((half, args.photos // 2), (full, args.photos)):
                    home = work / f"{how}-{n}-{r}"
                    report = run(home, model, folder, how == "ray")
                    assert report["added"] == n, report
                    seconds.setdefault((how, n), []).append(report["seconds"])
                    print(f"round {r} {how:5} {n} photos: {report['seconds']:.1f} s", flush=True)
        rows, rates = [], {}
        for how in ("plain", "ray"):
            s_half = statistics.median(seconds[(how, args.photos // 2)])
            s_full = statistics.median(seconds[(how, args.photos)])
            # the second half's rate; not measurable when noise made the smaller run the slower one
            steady = (args.photos - args.photos // 2) / (s_full - s_half) if s_full > s_half else float("nan")
            rates[how] = (args.photos / s_full, steady)
            rows.append([how, f"{s_half:.1f}", f"{s_full:.1f}", f"{args.photos / s_full:.2f}", f"{steady:.2f}"])
        print(table(["run", f"{args.photos // 2} photos s", f"{args.photos} photos s", "img/s", "img/s steady"], rows))
        plain, ray = vectors(work / f"plain-{args.photos}-0"), vectors(work / f"ray-{args.photos}-0")
        same_files = plain.keys() == ray.keys()
        worst = max(float(np.abs(np.frombuffer(plain[k], np.float16).astype(np.float32)
                                 - np.frombuffer(ray[k], np.float16).astype(np.float32)).max()) for k in plain)
        print(f"same files: {same_files}; largest difference of a vector component: {worst:.2e}")
        print(f"--ray / plain: {rates['ray'][0] / rates['plain'][0]:.2f}x images/s per run, "
              f"{rates['ray'][1] / rates['plain'][1]:.2f}x steady (model loads excluded)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
