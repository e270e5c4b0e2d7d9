"""Catalog speed: bulk row writes (rows/s), id lookups, the unchanged-check scan, vector reads.

    python bench/catalog.py              # 100,000 rows of 512-d vectors
    python bench/catalog.py --rows 20000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import Timer, clustered_vectors, machine, percentiles, table

from mmsearch.store import Catalog


def rows_for(vectors: np.ndarray, start: int) -> list[dict]:
    return [
        {"path": f"/photos/{(start + i) // 1000:04d}/img_{start + i:07d}.jpg", "size": 1_500_000 + i,
         "mtime_ns": 1_700_000_000_000_000_000 + i, "content_hash": f"{start + i:032x}",
         "width": 3000, "height": 2000, "vector": v}
        for i, v in enumerate(vectors)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()
    print(machine())
    vectors = clustered_vectors(args.rows, args.dim)
    results = []
    with tempfile.TemporaryDirectory() as tmp, Catalog.open(Path(tmp) / "catalog.sqlite3") as catalog:
        half = args.rows // 2
        big = rows_for(vectors[:half], 0)
        with Timer() as t:
            for s in range(0, half, 10_000):
                catalog.write_images(big[s:s + 10_000], [])
        results.append(["insert, 10,000 rows per transaction", f"{half / t.seconds:,.0f} rows/s"])
        small = rows_for(vectors[half:], half)
        with Timer() as t:
            for s in range(0, len(small), 32):  # what one indexing batch writes
                catalog.write_images(small[s:s + 32], [])
        results.append(["insert, 32 rows per transaction (indexing batch)", f"{len(small) / t.seconds:,.0f} rows/s"])

        ids = catalog.ids("image")
        rng = np.random.default_rng(0)
        samples = [rng.choice(ids, 100, replace=False).tolist() for _ in range(200)]
        times = []
        for sample in samples:
            t0 = time.perf_counter()
            paths = catalog.image_paths(sample)
            times.append(time.perf_counter() - t0)
            assert len(paths) == 100
        p50, p95 = percentiles(times)
        results.append(["image_paths(100 random ids)", f"p50 {p50:.2f} ms, p95 {p95:.2f} ms"])
        lookup_p50 = p50
        hashes = [[f"{i:032x}" for i in s] for s in samples[:50]]
        times = []
        for hs in hashes:
            t0 = time.perf_counter()
            catalog.vectors_by_hash(hs)
            times.append(time.perf_counter() - t0)
        p50, p95 = percentiles(times)
        results.append(["vectors_by_hash(100 hashes)", f"p50 {p50:.2f} ms, p95 {p95:.2f} ms"])
        with Timer() as t:
            states = catalog.image_states(prefixes=["/photos"])
        assert len(states) == args.rows
        results.append([f"image_states: all {args.rows:,} rows (unchanged check)", f"{t.seconds * 1000:.0f} ms"])
        with Timer() as t:
            n = sum(len(i) for i, _ in catalog.iter_vectors("image", args.dim))
        results.append([f"iter_vectors: read all {n:,} vectors (index rebuild)", f"{n / t.seconds:,.0f} vectors/s"])
    print(table(["operation", "speed"], results))
    bulk = float(results[0][1].split()[0].replace(",", ""))
    print(f"KEY: bulk insert {bulk:,.0f} rows/s (target >= 80,000), lookup of 100 ids p50 {lookup_p50:.2f} ms (target <= 5)")


if __name__ == "__main__":
    main()
