"""`reindex`: what staging and the switch cost, and a whole run against indexing afresh.

``--rows N`` (catalog only, no model): a catalog of N images of 512-d vectors
(float16, as stored) gets N staged 768-d vectors, written as a run writes
them (batches of 32); then the switch moves them in, in one transaction.
Prints staging rows/s, the switch's seconds, and how long a reader's query
(the generation, as every search reads it) waited while the switch ran.

``--images N`` (end to end, tiny random models): N generated pictures are
indexed with model A; then, side by side, ``index`` into a fresh home with
model B and ``reindex`` of the first home to B, each in a child process.

    python bench/reindex_switch.py --rows 100000
    python bench/reindex_switch.py --images 400
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import ROOT, machine, table

from mmsearch.decode import content_hash
from mmsearch.staging import Staging
from mmsearch.store import Catalog


def unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def switch_cost(rows: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        catalog = Catalog.open(Path(tmp) / "catalog.sqlite3")
        catalog.set_meta({"vector_dtype": "float16", "model": "A", "dim": "512"})
        catalog = Catalog.open(Path(tmp) / "catalog.sqlite3")
        for start in range(0, rows, 10_000):
            n = min(10_000, rows - start)
            catalog.write_images([
                {"path": f"/photos/{start + i:07d}.jpg", "size": 1000 + i, "mtime_ns": i,
                 "content_hash": content_hash(str(start + i).encode()), "width": 30, "height": 20, "vector": v}
                for i, v in enumerate(unit(n, 512, start))
            ], [])
        ids = catalog.ids("image")
        states = {s.id: s for s in catalog.image_states().values()}
        staging = Staging(catalog)
        staging.begin("B", None, 768)
        new = unit(rows, 768, 1)
        started = time.perf_counter()
        for start in range(0, rows, 32):
            chunk = ids[start:start + 32]
            staging.put("image", [
                {"id": int(i), "source": states[int(i)].content_hash, "size": 1, "mtime_ns": 1, "width": 30,
                 "height": 20, "vector": new[start + j]}
                for j, i in enumerate(chunk)
            ])
        staged_s = time.perf_counter() - started
        waits: list[float] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                catalog.generation("image")
                waits.append(time.perf_counter() - t0)
                time.sleep(0.005)

        thread = threading.Thread(target=reader)
        thread.start()
        started = time.perf_counter()
        staging.switch({"model": "B", "dim": "768"})
        switch_s = time.perf_counter() - started
        stop.set()
        thread.join()
        assert catalog.get_meta("dim") == "768" and Staging(catalog).count() == 0
        catalog.close()
    print(table(
        ["rows", "staging rows/s", "switch s", "reader queries", "slowest reader ms"],
        [[rows, f"{rows / staged_s:,.0f}", f"{switch_s:.2f}", len(waits), f"{max(waits) * 1000:.1f}"]],
    ))
    print(f"switch of {rows:,} images: {switch_s:.2f} s; readers never waited more than {max(waits) * 1000:.1f} ms")


def end_to_end(images: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import TINY_CFG, make_image, save_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a = save_tiny_model(root / "a")
        cfg = json.loads(json.dumps(TINY_CFG))
        cfg["embed_dim"] = 24
        b = save_tiny_model(root / "b", seed=1, cfg=cfg)
        rng = np.random.default_rng(0)
        for i in range(images):
            make_image(root / "photos" / f"{i // 100:03d}" / f"{i:05d}.jpg",
                       tuple(int(c) for c in rng.integers(0, 256, 3)), (640, 480))

        def run(*args: str) -> float:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "mmsearch", *args], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL)
            return time.perf_counter() - started

        run("--home", str(root / "h1"), "--model", str(a), "index", "-q", str(root / "photos"))
        fresh = run("--home", str(root / "h2"), "--model", str(b), "index", "-q", str(root / "photos"))
        switched = run("--home", str(root / "h1"), "--model", str(b), "reindex", "-q")
    print(table(["images", "index afresh s", "reindex s"], [[images, f"{fresh:.1f}", f"{switched:.1f}"]]))
    print(f"reindex / index afresh: {switched / fresh:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=0)
    parser.add_argument("--images", type=int, default=0)
    args = parser.parse_args()
    print(machine())
    if args.rows:
        switch_cost(args.rows)
    if args.images:
        end_to_end(args.images)


if __name__ == "__main__":
    main()
