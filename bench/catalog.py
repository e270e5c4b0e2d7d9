"""Catalog speed on both backends, side by side: bulk row writes (rows/s), id lookups,
the unchanged-check scan, vector reads.

Bulk writes take turns in one run: rows as `index` and `add-texts` write them
(vectors already cast to the catalog's dtype) into SQLite and into PostgreSQL,
float32 rows into SQLite, and plain `sqlite3` with the same schema, the same
background WAL checkpoints and the tuples built beforehand (SQLite's ceiling).
PostgreSQL is a throwaway local cluster (tests/pg.py: initdb in a temporary
folder, a Unix socket, fsync on) unless --postgres names a database.

    python bench/catalog.py              # 100,000 rows of 512-d vectors
    python bench/catalog.py --rows 20000
    python bench/catalog.py --postgres 'postgresql+psycopg://me@/bench?host=/run/postgresql'
    python bench/catalog.py --no-postgres
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import ROOT, Timer, clustered_vectors, machine, percentiles, table

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


def reads(catalog: Catalog, rows: int, dim: int) -> dict[str, str]:
    """The read operations' figures on one catalog, by operation."""
    out: dict[str, str] = {}
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
    out["lookup"] = f"{p50:.2f}"
    out["image_paths(100 random ids)"] = f"p50 {p50:.2f} ms, p95 {p95:.2f} ms"
    hashes = [{h: i for i, h in catalog.image_hashes(s).items()} for s in samples[:50]]
    times = []
    for hs in hashes:
        t0 = time.perf_counter()
        catalog.vectors_by_hash(hs)
        times.append(time.perf_counter() - t0)
    p50, p95 = percentiles(times)
    out["vectors_by_hash(100 hashes, by id)"] = f"p50 {p50:.2f} ms, p95 {p95:.2f} ms"
    with Timer() as t:
        states = catalog.image_states(prefixes=["/photos"])
    assert len(states) == rows
    out[f"image_states: all {rows:,} rows (unchanged check)"] = f"{t.seconds * 1000:.0f} ms"
    with Timer() as t:
        n = sum(len(i) for i, _ in catalog.iter_vectors("image", dim))
    out[f"iter_vectors: read all {n:,} vectors (index rebuild)"] = f"{n / t.seconds:,.0f} vectors/s"
    return out


def postgres_url(args: argparse.Namespace) -> tuple[str | None, object | None]:
    """The database to measure on, and the throwaway server to stop afterwards (if one was started)."""
    if args.no_postgres:
        return None, None
    if args.postgres:
        return args.postgres, None
    sys.path.insert(0, str(ROOT / "tests"))
    import pg

    server = pg.start_server(fsync=True)
    return server.new_database(), server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--postgres", metavar="URL", help="an empty PostgreSQL database to measure on")
    ap.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = ap.parse_args()
    print(machine())
    vectors = clustered_vectors(args.rows, args.dim)
    url, server = postgres_url(args)
    try:
        run(args, vectors, url)
    finally:
        if server is not None:
            import pg

            pg.remove(server)


def run(args: argparse.Namespace, vectors: np.ndarray, url: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp, Catalog.open(Path(tmp) / "catalog.sqlite3") as catalog, \
            Catalog.open(Path(tmp) / "float32-rows.sqlite3") as other:
        on_server = Catalog.open(url) if url else None
        plain = plain_connection(Path(tmp) / "plain.sqlite3")
        plain_checkpoints = Checkpointer(Path(tmp) / "plain.sqlite3")
        # Bulk: 10,000-row transactions into each catalog in turn, each getting
        # the same rows: as `index` and `add-texts` write them (vectors already
        # in the catalog's dtype; the pipeline casts each batch once, for the
        # FAISS index and the catalog alike) into SQLite and PostgreSQL, as
        # float32 (the catalog casts them), and through plain sqlite3, the ceiling.
        bulk = args.rows * 4 // 5
        stored = catalog.stored(vectors[:bulk])
        forms = ["stored", "float32", "plain", *(["postgresql"] if on_server else [])]
        seconds = dict.fromkeys(forms, 0.0)
        targets = {"stored": catalog, "float32": other, "postgresql": on_server}
        for n, s in enumerate(range(0, bulk, 10_000)):
            end = min(s + 10_000, bulk)
            for form in forms[n % len(forms):] + forms[:n % len(forms)]:  # each goes first in turn
                if form == "plain":
                    seconds[form] += plain_insert(plain, rows_for(stored[s:end], s), plain_checkpoints)
                    continue
                rows = rows_for(vectors[s:end] if form == "float32" else stored[s:end], s)
                with Timer() as t:
                    targets[form].write_images(rows, [])
                seconds[form] += t.seconds
        plain_checkpoints.close()
        plain.close()
        rate = {form: bulk / secs for form, secs in seconds.items()}
        name = catalog.vector_dtype_name
        results = [
            [f"insert, 10,000 rows a transaction, {name} rows (as index writes them)", f"{rate['stored']:,.0f} rows/s",
             f"{rate['postgresql']:,.0f} rows/s" if on_server else "-"],
            ["insert, 10,000 rows a transaction, float32 rows (the catalog casts)", f"{rate['float32']:,.0f} rows/s", ""],
            [f"plain sqlite3, same schema, {name} rows as tuples built beforehand", f"{rate['plain']:,.0f} rows/s", ""],
        ]
        small = rows_for(catalog.stored(vectors[bulk:]), bulk)
        batch_rate = {}
        for label, target in (("sqlite", catalog), ("postgresql", on_server)):
            if target is None:
                continue
            with Timer() as t:
                for s in range(0, len(small), 32):  # what one indexing batch writes
                    target.write_images(small[s:s + 32], [])
            batch_rate[label] = f"{len(small) / t.seconds:,.0f} rows/s"
        results.append(["insert, 32 rows a transaction (indexing batch)", batch_rate["sqlite"],
                        batch_rate.get("postgresql", "-")])
        on_sqlite = reads(catalog, args.rows, args.dim)
        on_pg = reads(on_server, args.rows, args.dim) if on_server else {}
        results += [[op, value, on_pg.get(op, "-")] for op, value in on_sqlite.items() if op != "lookup"]
        if on_server:
            on_server.close()
    print(table(["operation", "SQLite", "PostgreSQL"], results))
    key = (f"KEY: bulk insert SQLite {rate['stored']:,.0f} rows/s (target >= 80,000; {rate['stored'] / rate['plain']:.2f} "
           f"of plain sqlite3), lookup of 100 ids p50 {on_sqlite['lookup']} ms (target <= 5)")
    if on_server:
        key += (f"; PostgreSQL {rate['postgresql']:,.0f} rows/s (target >= 50,000), "
                f"lookup of 100 ids p50 {on_pg['lookup']} ms")
    print(key)


if __name__ == "__main__":
    main()
