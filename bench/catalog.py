"""Catalog speed: bulk row writes (rows/s), id lookups, the unchanged-check scan, vector reads.

Bulk writes take turns in one run: rows as `index` and `add-texts` write them
(vectors already cast to the catalog's dtype), float32 rows, and plain
`sqlite3` with the same schema, the same background WAL checkpoints and the
tuples built beforehand (the ceiling).

    python bench/catalog.py              # 100,000 rows of 512-d vectors
    python bench/catalog.py --rows 20000
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import Timer, clustered_vectors, machine, percentiles, table

from mmsearch.decode import content_hash
from mmsearch.sqlite_backend import Checkpointer
from mmsearch.store import Catalog


def rows_for(vectors: np.ndarray, start: int) -> list[dict]:
    """Rows as the indexer writes them: paths in walk order, content hashes as random as real ones."""
    return [
        {"path": f"/photos/{(start + i) // 1000:04d}/img_{start + i:07d}.jpg", "size": 1_500_000 + i,
         "mtime_ns": 1_700_000_000_000_000_000 + i, "content_hash": content_hash(str(start + i).encode()),
         "width": 3000, "height": 2000, "vector": v}
        for i, v in enumerate(vectors)
    ]


def plain_insert(conn: sqlite3.Connection, rows: list[dict], checkpointer: Checkpointer) -> float:
    """Seconds for plain `sqlite3` to insert ``rows`` (tuples built beforehand) in one transaction,
    with the WAL checkpointed in the background as the catalog does it."""
    tuples = [(r["path"], r["size"], r["mtime_ns"], r["content_hash"], r["width"], r["height"],
               r["vector"].tobytes(), 0.0) for r in rows]
    with Timer() as t:
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO images (path, size, mtime_ns, content_hash, width, height, vector, indexed_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", tuples)
        conn.execute("COMMIT")
        checkpointer.poke()
    return t.seconds


def plain_connection(path: Path) -> sqlite3.Connection:
    """A connection to a catalog made by `Catalog.open`, with its per-connection pragmas and none of its Python.
    Kept open for the whole run, as the catalog's is: closing the last one checkpoints the WAL."""
    Catalog.open(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("cache_size=-65536", "synchronous=NORMAL", "wal_autocheckpoint=8192"):  # the rest is in the file
        conn.execute(f"PRAGMA {pragma}")
    return conn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    args = ap.parse_args()
    print(machine())
    vectors = clustered_vectors(args.rows, args.dim)
    results = []
    with tempfile.TemporaryDirectory() as tmp, Catalog.open(Path(tmp) / "catalog.sqlite3") as catalog, \
            Catalog.open(Path(tmp) / "float32-rows.sqlite3") as other:
        plain = plain_connection(Path(tmp) / "plain.sqlite3")
        plain_checkpoints = Checkpointer(Path(tmp) / "plain.sqlite3")
        # Bulk: 10,000-row transactions into three catalogs in turn, each
        # getting the same rows: as `index` and `add-texts` write them (vectors
        # already in the catalog's dtype; the pipeline casts each batch once,
        # for the FAISS index and the catalog alike), as float32 (the catalog
        # casts them), and through plain sqlite3, the ceiling.
        bulk = args.rows * 4 // 5
        stored = catalog.stored(vectors[:bulk])
        seconds = {"stored": 0.0, "float32": 0.0, "plain": 0.0}
        for n, s in enumerate(range(0, bulk, 10_000)):
            end = min(s + 10_000, bulk)
            forms = ["stored", "float32", "plain"]
            for form in forms[n % 3:] + forms[:n % 3]:  # each goes first in turn
                if form == "plain":
                    seconds[form] += plain_insert(plain, rows_for(stored[s:end], s), plain_checkpoints)
                    continue
                rows = rows_for(stored[s:end] if form == "stored" else vectors[s:end], s)
                with Timer() as t:
                    (catalog if form == "stored" else other).write_images(rows, [])
                seconds[form] += t.seconds
        plain_checkpoints.close()
        plain.close()
        rate = {form: bulk / secs for form, secs in seconds.items()}
        name = catalog.vector_dtype_name
        results.append([f"insert, 10,000 rows a transaction, {name} rows (as index writes them)",
                        f"{rate['stored']:,.0f} rows/s"])
        results.append(["insert, 10,000 rows a transaction, float32 rows (the catalog casts)",
                        f"{rate['float32']:,.0f} rows/s"])
        results.append([f"plain sqlite3, same schema, {name} rows as tuples built beforehand",
                        f"{rate['plain']:,.0f} rows/s"])
        small = rows_for(catalog.stored(vectors[bulk:]), bulk)
        with Timer() as t:
            for s in range(0, len(small), 32):  # what one indexing batch writes
                catalog.write_images(small[s:s + 32], [])
        results.append(["insert, 32 rows a transaction (indexing batch)", f"{len(small) / t.seconds:,.0f} rows/s"])

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
        hashes = [{h: i for i, h in catalog.image_hashes(s).items()} for s in samples[:50]]
        times = []
        for hs in hashes:
            t0 = time.perf_counter()
            catalog.vectors_by_hash(hs)
            times.append(time.perf_counter() - t0)
        p50, p95 = percentiles(times)
        results.append(["vectors_by_hash(100 hashes, by id)", f"p50 {p50:.2f} ms, p95 {p95:.2f} ms"])
        with Timer() as t:
            states = catalog.image_states(prefixes=["/photos"])
        assert len(states) == args.rows
        results.append([f"image_states: all {args.rows:,} rows (unchanged check)", f"{t.seconds * 1000:.0f} ms"])
        with Timer() as t:
            n = sum(len(i) for i, _ in catalog.iter_vectors("image", args.dim))
        results.append([f"iter_vectors: read all {n:,} vectors (index rebuild)", f"{n / t.seconds:,.0f} vectors/s"])
    print(table(["operation", "speed"], results))
    print(f"KEY: bulk insert {rate['stored']:,.0f} rows/s (target >= 80,000; {rate['stored'] / rate['plain']:.2f} of plain "
          f"sqlite3), lookup of 100 ids p50 {lookup_p50:.2f} ms (target <= 5)")


if __name__ == "__main__":
    main()
