"""`add-texts` on a generated corpus of N short lines: lines/s and peak memory.

Each size runs in a fresh child process (its own peak RSS, VmHWM), on a new
home in a temp folder, with a tiny random open_clip model (embed 32, one
text layer) unless --model is given: the point is the pipeline's memory and
the catalog/index work, not the model. Lines are like short captions, all
distinct. ``--kill-after S`` stops a run after S seconds and reports its
rate and peak so far (memory must be flat by then, however long the corpus).

    python bench/add_texts.py --lines 250000,500000,1000000
    python bench/add_texts.py --lines 9000000 --kill-after 300
    python bench/add_texts.py --index-only 9000000

``--index-only N`` times the last step alone, the one a killed run does not
reach: a catalog of N texts (random unit vectors of the tiny model's 32
dimensions, float16 as the catalog stores them) is written once, then a
fresh process imports torch and the model as add-texts does and builds the
IVF index from it, as add-texts does at its end past the threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import CACHE, ROOT, machine, table

WORDS = ("a red car a small dog on the beach at sunset a blue sky over green hills an old man reading "
         "two children playing in the snow a bowl of fruit on a wooden table").split()


def corpus(path: Path, lines: int) -> Path:
    """``lines`` distinct captions of 4-9 words (kept between runs)."""
    if path.exists():
        return path
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for i in range(lines):
            words = [WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(4 + i % 6)]
            fh.write(f"{' '.join(words)} {i}\n")
    os.replace(tmp, path)
    return path


def tiny_model() -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny_model

    folder = CACHE / "tiny-text-model"
    if not (folder / "open_clip_model.safetensors").exists():
        save_tiny_model(folder)
    return folder


CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from _common import peak_rss_mib
from mmsearch.home import Home
from mmsearch.index import sidecar_path
from mmsearch.settings import resolve
from mmsearch.texts import add_texts
if int(sys.argv[5]):
    import torch
    torch.set_num_threads(int(sys.argv[5]))
started = time.perf_counter()
with Home.open(resolve(home=Path(sys.argv[2]), model=sys.argv[3])) as home:
    report = add_texts(home, Path(sys.argv[4]), progress=False)
    index_type = json.loads(sidecar_path(home.settings.index_path("text")).read_text())["index_type"]
print(json.dumps({"report": report.as_dict(), "seconds": time.perf_counter() - started,
                  "peak_mib": peak_rss_mib(), "index": index_type}))
"""


def run(lines: int, model: str, kill_after: float | None, threads: int) -> dict:
    path = corpus(CACHE / f"captions-{lines}.txt", lines)
    with tempfile.TemporaryDirectory(prefix="mmsearch-bench-texts-") as tmp:
        args = [sys.executable, "-c", CHILD, str(Path(__file__).parent), str(Path(tmp) / "home"), model, str(path), str(threads)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        started = time.perf_counter()
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, env=env, text=True)
        try:
            out, _ = proc.communicate(timeout=kill_after)
            result = json.loads(out.strip().splitlines()[-1])
            result["rate"] = lines / result["seconds"]
            return result
        except subprocess.TimeoutExpired:
            # killed: rate and peak from the catalog it committed and the child's VmHWM
            status = Path(f"/proc/{proc.pid}/status").read_text()
            peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM")).split()[1]) / 1024
            proc.kill()
            proc.wait()
            seconds = time.perf_counter() - started
            import sqlite3

            db = sqlite3.connect(Path(tmp) / "home" / "catalog.sqlite3")
            done = db.execute("SELECT count(*) FROM texts").fetchone()[0]
            db.close()
            return {"report": {"added": done}, "seconds": seconds, "peak_mib": peak, "index": "(killed)",
                    "rate": done / seconds}


INDEX_CHILD = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from _common import peak_rss_mib
from mmsearch.home import Home
from mmsearch.index import build_from_catalog
from mmsearch.settings import resolve
with Home.open(resolve(home=Path(sys.argv[2]), model=sys.argv[3])) as home:
    home.encoder()  # what add-texts holds when it builds the index
    base = peak_rss_mib()
    started = time.perf_counter()
    index = build_from_catalog(home.catalog, "text", home.dim, home.spec.canonical)
    seconds = time.perf_counter() - started
    home.save_index(index)
print(json.dumps({"seconds": seconds, "base_mib": base, "peak_mib": peak_rss_mib(), "index": index.index_type,
                  "nlist": int(getattr(index.faiss_index, "nlist", 0)), "count": index.count}))
"""


def index_only(count: int, model: str) -> None:
    """Build the end-of-run IVF index of ``count`` catalogued texts in a fresh process."""
    import numpy as np

    from mmsearch.home import Home
    from mmsearch.settings import resolve

    home_dir = CACHE / f"texts-home-{count}"
    marker = home_dir / "complete"
    if not marker.exists():
        import shutil

        shutil.rmtree(home_dir, ignore_errors=True)
        rng = np.random.default_rng(0)
        with Home.open(resolve(home=home_dir, model=model)) as home:
            dim = home.encoder().dim
            started = time.perf_counter()
            for start in range(0, count, 50_000):
                n = min(50_000, count - start)
                vectors = rng.standard_normal((n, dim), dtype=np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                rows = [{"key": f"t{start + i}", "text": f"text {start + i}", "source": "/bench/corpus.txt",
                         "meta": None, "vector": v} for i, v in enumerate(home.catalog.stored(vectors))]
                home.catalog.write_texts(rows, [])
            print(f"wrote {count:,} catalog rows in {time.perf_counter() - started:.0f} s", flush=True)
        marker.write_text("")
    args = [sys.executable, "-c", INDEX_CHILD, str(Path(__file__).parent), str(home_dir), model]
    out = subprocess.run(args, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True,
                         check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(table(["texts", "index", "nlist", "build s", "RSS before MiB", "peak RSS MiB"],
                [[f"{r['count']:,}", r["index"], r["nlist"], f"{r['seconds']:.0f}", f"{r['base_mib']:,.0f}",
                  f"{r['peak_mib']:,.0f}"]]))
    print(f"peak RSS, index build at {count:,}: {r['peak_mib']:,.0f} MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", default="250000,500000,1000000", help="comma-separated corpus sizes")
    ap.add_argument("--model", default=None, help="model spec (default: a tiny random open_clip model)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default, one per core)")
    ap.add_argument("--index-only", type=int, default=0, metavar="N",
                    help="only build the end-of-run IVF index of N catalogued texts (see above)")
    ap.add_argument("--kill-after", type=float, default=None, help="stop each run after this many seconds")
    args = ap.parse_args()
    print(machine())
    print(f"torch threads: {args.threads or 'default'}; load average {os.getloadavg()[0]:.1f}")
    model = args.model or f"local-dir:{tiny_model()}"
    if args.index_only:
        index_only(args.index_only, model)
        return
    rows = []
    for lines in (int(n) for n in args.lines.split(",")):
        r = run(lines, model, args.kill_after, args.threads)
        size = (CACHE / f"captions-{lines}.txt").stat().st_size / 2**20
        rows.append([f"{lines:,}", f"{size:.0f} MiB", f"{r['report']['added']:,}", f"{r['seconds']:.0f}",
                     f"{r['rate']:,.0f}", f"{r['peak_mib']:,.0f}", r["index"]])
        print(table(["lines", "file", "added", "s", "lines/s", "peak RSS MiB", "index"], rows[-1:]), flush=True)
    print()
    print(table(["lines", "file", "added", "s", "lines/s", "peak RSS MiB", "index"], rows))
    print(f"peak RSS, largest run: {rows[-1][5]} MiB")


if __name__ == "__main__":
    main()
