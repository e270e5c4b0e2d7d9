"""The overhead of Ray: the same folder through `mmsearch index --ray` and a plain `mmsearch index`.

Each run is a fresh process on a fresh home; the ``--ray`` one starts a local
Ray cluster on this machine (all its cores). Runs go through
``bench/_timed_index.py``, which runs the CLI's own ``index`` and stamps every
batch as the catalog writer receives it. The *steady* rate of a run is the
slope of images written against time, from the first batch to the last
(a least-squares fit over every batch): the cluster's start-up, the actors' model loads and the first batch drop
out, as the issue's "start-up excluded" asks. ``seconds`` of ``--json`` (after
the cluster is up, model loads included) gives the per-run rate. Runs
alternate, ``--rounds`` times, the order flipping every round; each round's
``--ray`` steady rate is divided by the plain one beside it, and the median of
those paired ratios is the headline. The catalogs of the two kinds of run are
then compared: the same files, the same vectors.

    python bench/ray_index.py --photos 600 --rounds 4
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


def run(home: Path, model: Path, folder: Path, ray: bool) -> tuple[dict, float]:
    """One run: its ``--json`` summary and its steady rate (images/s after the first batch)."""
    stamps_file = home.with_suffix(".stamps.json")
    cmd = [sys.executable, str(ROOT / "bench" / "_timed_index.py"), str(stamps_file),
           "--home", str(home), "--model", f"local-dir:{model}",
           "index", str(folder), "--json"] + (["--ray"] if ray else [])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster, on this machine
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    t, done = np.array(json.loads(stamps_file.read_text()), dtype=np.float64).T
    # the slope of images written against time, first batch to last: lanes that hand in batches
    # in bunches do not tilt it as a first-to-last quotient would
    return json.loads(out.stdout.strip().splitlines()[-1]), float(np.polyfit(t - t[0], done, 1)[0])


def vectors(home: Path) -> dict[str, bytes]:
    with sqlite3.connect(home / "catalog.sqlite3") as db:
        return {Path(p).name: v for p, v in db.execute("select path, vector from images")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=600, help="photos in the folder")
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds of plain and --ray runs")
    ap.add_argument("--size", default="1500x1000", help="photo size, WxH")
    args = ap.parse_args()
    print(machine())
    w, h = (int(x) for x in args.size.split("x"))
    cache = make_photos(CACHE / f"ray-photos-{args.size}", args.photos, (w, h))
    photos = sorted(cache.glob("*.jpg"))[: args.photos]
    folder = CACHE / f"ray-photos-{args.size}-first-{args.photos}"
    if not folder.exists():  # the first n photos of the cache, as links
        folder.mkdir(parents=True)
        for p in photos:
            os.link(p, folder / p.name)
    model = vit_b32_dir()
    work = Path(tempfile.mkdtemp(prefix="ray-bench-"))
    steady: dict[str, list[float]] = {"plain": [], "ray": []}
    per_run: dict[str, list[float]] = {"plain": [], "ray": []}
    paired, rows = [], []
    try:
        for r in range(args.rounds):
            order = ("plain", "ray") if r % 2 == 0 else ("ray", "plain")
            for how in order:
                report, rate = run(work / f"{how}-{r}", model, folder, how == "ray")
                assert report["added"] == args.photos, report
                steady[how].append(rate)
                per_run[how].append(args.photos / report["seconds"])
            paired.append(steady["ray"][-1] / steady["plain"][-1])
            rows.append([str(r), f"{steady['plain'][-1]:.2f}", f"{steady['ray'][-1]:.2f}", f"{paired[-1]:.2f}",
                         f"{per_run['plain'][-1]:.2f}", f"{per_run['ray'][-1]:.2f}", f"{os.getloadavg()[0]:.1f}"])
            print(" | ".join(rows[-1]), flush=True)
        print(table(["round", "plain steady img/s", "--ray steady img/s", "ratio", "plain per run img/s",
                     "--ray per run img/s", "load"], rows))
        plain, ray = vectors(work / "plain-0"), vectors(work / "ray-0")
        same_files = plain.keys() == ray.keys()
        worst = max(float(np.abs(np.frombuffer(plain[k], np.float16).astype(np.float32)
                                 - np.frombuffer(ray[k], np.float16).astype(np.float32)).max()) for k in plain)
        print(f"same files: {same_files}; largest difference of a vector component: {worst:.2e}")
        med = {how: statistics.median(v) for how, v in steady.items()}
        run_ratio = statistics.median(per_run["ray"]) / statistics.median(per_run["plain"])
        print(f"medians: plain {med['plain']:.2f} img/s steady, --ray {med['ray']:.2f}; per run {run_ratio:.2f}x")
        print(f"--ray / plain: {statistics.median(paired):.2f}x steady (median of {len(paired)} paired rounds, "
              f"range {min(paired):.2f}-{max(paired):.2f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
