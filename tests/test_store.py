"""The catalog: migrations agree with the models, bulk writes, generations."""

from pathlib import Path

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from mmsearch.migrate import head_revision, upgrade
from mmsearch.schema import Base
from mmsearch.store import Catalog, from_blobs, make_engine


def where(catalog_url: str | None, tmp_path: Path) -> Path | str:
    """The catalog a parametrised test opens: a SQLite file, or the test's own PostgreSQL database."""
    return catalog_url if catalog_url is not None else tmp_path / "c.sqlite3"


def test_upgrade_head_on_empty_database_matches_models(tmp_path: Path, catalog_url):
    if catalog_url is None:
        engine = make_engine(tmp_path / "empty.sqlite3")
        upgrade(engine)
    else:
        from mmsearch.postgres_backend import MIGRATION_LOCK, advisory_lock
        from mmsearch.postgres_backend import make_engine as make_pg_engine

        engine = make_pg_engine(catalog_url)
        upgrade(engine, lock=lambda: advisory_lock(engine, MIGRATION_LOCK, wait=True))
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"render_as_batch": True})
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, Base.metadata) == []
    assert set(inspect(engine).get_table_names()) >= {"meta", "images", "texts", "skipped", "alembic_version"}
    if catalog_url is not None:  # 64-bit sizes and times (a 1.7e18 ns mtime, a 5 GB file)
        columns = {c["name"]: c["type"] for c in inspect(engine).get_columns("images")}
        assert type(columns["mtime_ns"]).__name__ == type(columns["size"]).__name__ == "BIGINT"
    engine.dispose()


def test_open_is_idempotent_and_uses_wal(tmp_path: Path):
    path = tmp_path / "c.sqlite3"
    Catalog.open(path).close()
    with Catalog.open(path) as catalog:
        with catalog.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def _row(i: int, dim: int = 4) -> dict:
    return {
        "path": f"/photos/{i}.jpg", "size": i, "mtime_ns": i * 10, "content_hash": f"h{i}",
        "width": 8, "height": 6, "vector": np.full(dim, i, dtype=np.float32),
    }


def test_bulk_write_update_delete_and_generation(tmp_path: Path, catalog_url):
    with Catalog.open(where(catalog_url, tmp_path)) as catalog:
        assert catalog.generation("image") == 0
        ids = catalog.write_images([_row(i) for i in range(1000)], [])
        assert len(ids) == 1000 and catalog.count("image") == 1000
        assert catalog.generation("image") == 1 and catalog.generation("text") == 0
        states = catalog.image_states(prefixes=["/photos"])
        assert states["/photos/7.jpg"].content_hash == "h7"
        assert catalog.image_states(prefixes=["/elsewhere"]) == {}
        catalog.write_images([], [{"id": ids[0], **_row(0), "content_hash": "new"}], removed_ids=ids[1:3])
        assert catalog.count("image") == 998
        assert catalog.image_states()["/photos/0.jpg"].content_hash == "new"
        got = {i: v for chunk_ids, vecs in catalog.iter_vectors("image", 4, chunk=300) for i, v in zip(chunk_ids, vecs)}
        assert len(got) == 998 and got[ids[5]][0] == 5.0


def test_ids_are_never_reused(tmp_path: Path, catalog_url):
    with Catalog.open(where(catalog_url, tmp_path)) as catalog:
        first = catalog.write_images([_row(1)], [])
        catalog.write_images([], [], removed_ids=first)
        second = catalog.write_images([_row(2)], [])
        assert second[0] > first[0]


def test_blobs_round_trip():
    vectors = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_array_equal(from_blobs([v.astype("<f4").tobytes() for v in vectors], 5), vectors)


def test_new_catalog_stores_float16_and_a_rebuild_sees_what_stored_returns(tmp_path: Path, catalog_url):
    rng = np.random.default_rng(0)
    vectors, queries = rng.standard_normal((200, 512)).astype(np.float32), rng.standard_normal((20, 512)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    with Catalog.open(where(catalog_url, tmp_path)) as catalog:
        assert catalog.vector_dtype_name == "float16"
        rows = [{**_row(i, 512), "vector": v} for i, v in enumerate(vectors)]
        ids = catalog.write_images(rows, [])
        with catalog.engine.connect() as conn:  # float16 blobs (bytea on PostgreSQL)
            assert conn.exec_driver_sql("SELECT DISTINCT length(vector) FROM images").scalars().all() == [1024]
        (read_ids, read), = catalog.iter_vectors("image", 512)
        assert read_ids.tolist() == ids
        np.testing.assert_array_equal(read, catalog.stored(vectors))  # live index == rebuilt index
        assert np.abs(queries @ read.T - queries @ vectors.T).max() < 1e-4  # cosine scores barely move
        found = catalog.vectors_by_hash({"h5": ids[5], "h6": ids[7]})  # h6's id is not h6's row
        assert list(found) == ["h5"] and found["h5"][1:] == (8, 6)
        np.testing.assert_array_equal(found["h5"][0], read[5])


def test_a_bulk_write_spans_cast_blocks_and_takes_rows_of_any_float_dtype(tmp_path: Path, catalog_url):
    from mmsearch.codecs import CAST_BLOCK

    n = 2 * CAST_BLOCK + 7  # three blocks, the last one short
    vectors = np.random.default_rng(1).standard_normal((n, 16)).astype(np.float32)
    with Catalog.open(where(catalog_url, tmp_path)) as catalog:
        stored = catalog.stored(vectors)
        assert stored.dtype == np.float16  # what the pipeline hands the catalog and the index
        # rows already in the catalog's dtype and float32 rows, mixed inside each block
        rows = [{**_row(i, 16), "vector": stored[i] if i % 3 else vectors[i]} for i in range(n)]
        ids = catalog.write_images(rows, [])
        (read_ids, read), = catalog.iter_vectors("image", 16, chunk=n)
        assert read_ids.tolist() == ids and read.dtype == np.float32
        np.testing.assert_array_equal(read, stored.astype(np.float32))  # each row in its place, cast once


def test_a_failed_write_is_one_line_and_loses_nothing(tmp_path: Path):
    from mmsearch.errors import CatalogError

    path = tmp_path / "c.sqlite3"
    with Catalog.open(path) as catalog:
        first = catalog.write_images([_row(i) for i in range(3)], [])
        with catalog.engine.begin() as conn:  # SQLite refusing a row, as a full disk would
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE INSERT ON images WHEN NEW.path = '/photos/1500.jpg' "
                "BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END"
            )
        rows = [_row(i) for i in range(3, 2000)]
        with pytest.raises(CatalogError) as caught:
            catalog.write_images(rows, [], removed_ids=first[:1])
        assert str(caught.value) == f"cannot write to catalog {path}: database or disk is full; nothing was changed"
        assert catalog.ids("image").tolist() == first and catalog.generation("image") == 1


def test_a_catalog_with_float32_rows_keeps_float32(tmp_path: Path):
    from alembic import command

    from mmsearch.migrate import alembic_config

    path = tmp_path / "old.sqlite3"
    engine = make_engine(path)
    command.upgrade(alembic_config(engine), "0003")  # a catalog written before float16 storage
    vector = np.linspace(-1, 1, 8, dtype=np.float32) / 3
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO images (path, size, mtime_ns, content_hash, width, height, vector, indexed_at) "
            "VALUES ('/p/a.jpg', 1, 1, 'h', 1, 1, ?, 0)", (vector.astype("<f4").tobytes(),),
        )
    engine.dispose()
    with Catalog.open(path) as catalog:
        assert catalog.vector_dtype_name == "float32"
        np.testing.assert_array_equal(catalog.vectors("image", [1], 8)[1], vector)  # bit for bit
        catalog.write_images([{**_row(2, 8), "vector": vector}], [])
        (_, read), = catalog.iter_vectors("image", 8)
        np.testing.assert_array_equal(read, np.stack([vector, vector]))


def test_prefix_is_a_folder_boundary(tmp_path: Path, catalog_url):
    with Catalog.open(where(catalog_url, tmp_path)) as catalog:
        catalog.write_images([{**_row(1), "path": "/photos2/a.jpg"}, {**_row(2), "path": "/photos/b.jpg"}], [])
        assert list(catalog.image_states(prefixes=["/photos"])) == ["/photos/b.jpg"]


def test_unreadable_catalog_is_a_clear_error(tmp_path: Path):
    from mmsearch.errors import CatalogError

    bad = tmp_path / "c.sqlite3"
    bad.write_bytes(b"this is not a database" * 100)
    with pytest.raises(CatalogError, match="cannot open catalog"):
        Catalog.open(bad)


def test_a_damaged_vector_is_a_catalog_error_not_a_crash():
    from mmsearch.errors import CatalogError

    with pytest.raises(CatalogError, match="1 stored vectors are not 4 float32 values"):
        from_blobs([np.zeros(4, dtype="<f4").tobytes(), b"\x00" * 8], 4)


def test_content_hashes_are_not_indexed_and_0005_goes_both_ways(tmp_path: Path):
    from alembic import command

    from mmsearch.migrate import alembic_config

    engine = make_engine(tmp_path / "c.sqlite3")
    config = alembic_config(engine)
    indexes = lambda: {ix["name"] for ix in inspect(engine).get_indexes("images")}  # noqa: E731
    command.upgrade(config, "0004")
    assert "ix_images_content_hash" in indexes()
    upgrade(engine)
    assert "ix_images_content_hash" not in indexes()
    command.downgrade(config, "0004")
    assert "ix_images_content_hash" in indexes()
    engine.dispose()


def test_commits_are_checkpointed_in_the_background_and_close_stops_the_thread(tmp_path: Path):
    import threading

    def checkpointers() -> int:
        return sum(t.name == "mmsearch-checkpoint" for t in threading.enumerate())

    path = tmp_path / "c.sqlite3"
    with Catalog.open(path) as catalog:
        before = path.stat().st_size
        catalog.write_images([_row(i, 512) for i in range(2000)], [])
        assert catalog.backend.checkpointer.wait_idle(timeout=60)
        # the rows are in the database file itself, not only in the WAL (a
        # commit leaves them there until the WAL passes 256 MiB)
        assert path.stat().st_size > before + 2000 * 1024
        assert checkpointers() == 1
        catalog.write_images([_row(i, 512) for i in range(2000, 2100)], [])
        assert catalog.backend.checkpointer.wait_idle(timeout=60) and checkpointers() == 1  # one thread, reused
    assert checkpointers() == 0
    with Catalog.open(path) as catalog:
        assert catalog.count("image") == 2100


def test_a_checkpointer_that_cannot_connect_leaves_commits_to_checkpoint_themselves(tmp_path: Path, monkeypatch):
    import sqlite3

    from mmsearch.sqlite_backend import Checkpointer

    def refuse(self):
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(Checkpointer, "_connect", refuse)
    with Catalog.open(tmp_path / "c.sqlite3") as catalog:
        catalog.write_images([_row(1)], [])
        assert catalog.backend.checkpointer.wait_idle(timeout=30)
        catalog.write_images([_row(2)], [])  # no thread any more; writes go on
        assert catalog.backend.checkpointer.wait_idle(timeout=1) and catalog.count("image") == 2


# Names a POSIX file system allows: bytes that are not UTF-8 (shown as lone surrogates),
# control characters, PostgreSQL's escape character and text that looks like its escapes.
AWKWARD_PATHS = [
    "/photos/caf\udce9.jpg", "/photos/\udcff\udcfe/x.png", "/photos/tab\there.jpg", "/photos/soh\x01x.jpg",
    "/photos/\x0141.jpg", "/photos/\x01ff.jpg", "/photos/ünïcødé 黒.png", "/photos/back\\slash.jpg",
]


def test_every_file_name_round_trips(tmp_path: Path, catalog_url):
    rows = [{**_row(i), "path": p} for i, p in enumerate(AWKWARD_PATHS)]
    with Catalog.open(where(catalog_url, tmp_path)) as catalog:
        ids = catalog.write_images(rows, [])
        assert catalog.image_paths(ids) == dict(zip(ids, AWKWARD_PATHS))
        assert set(catalog.image_states(prefixes=["/photos"])) == set(AWKWARD_PATHS)
        assert [p for p, _, _ in catalog.image_files()] == AWKWARD_PATHS
        # updated and skipped rows too
        catalog.write_images([], [{"id": ids[0], **rows[0], "content_hash": "new"}])
        assert catalog.image_states()[AWKWARD_PATHS[0]].content_hash == "new"
        catalog.write_skipped([{"path": p, "size": 1, "mtime_ns": 2, "reason": "bad"} for p in AWKWARD_PATHS], [])
        assert set(catalog.skipped_files(["/photos"])) == set(AWKWARD_PATHS)
        catalog.write_skipped([], AWKWARD_PATHS[:3])
        assert set(catalog.skipped_files(["/photos"])) == set(AWKWARD_PATHS[3:])


def test_postgres_path_escapes_are_reversible_and_leave_utf8_alone():
    from mmsearch.postgres_backend import path_from_db, path_to_db

    for path in [*AWKWARD_PATHS, "/nul\x00ff.jpg"]:  # NUL too, which no file name holds
        stored = path_to_db(path)
        assert "\x00" not in stored and stored.encode("utf-8")  # what PostgreSQL text can hold
        assert path_from_db(stored) == path
    assert len({path_to_db(p) for p in AWKWARD_PATHS}) == len(AWKWARD_PATHS)
    plain = "/photos/ünïcødé 黒/a b.jpg"
    assert path_to_db(plain) is plain


def test_a_lost_server_connection_is_one_line_and_the_next_write_goes_on(pg_server, monkeypatch):
    import mmsearch.store as store
    from mmsearch.errors import CatalogError

    url = pg_server.new_database()
    with Catalog.open(url) as catalog:
        first = catalog.write_images([_row(i) for i in range(3)], [])
        original = store._bump_generation

        def cut_then_bump(conn, kind):  # the server goes away in the middle of a transaction
            pg_server.terminate(url)
            original(conn, kind)

        monkeypatch.setattr(store, "_bump_generation", cut_then_bump)
        with pytest.raises(CatalogError) as caught:
            catalog.write_images([_row(i) for i in range(3, 6)], [], removed_ids=first[:1])
        message = str(caught.value)
        assert message.startswith(f"cannot write to catalog {url}: lost the connection to the server (")
        assert message.endswith("; nothing was changed") and "\n" not in message
        monkeypatch.setattr(store, "_bump_generation", original)
        # nothing committed is lost, nothing half-written stays; the pool connects again
        assert catalog.ids("image").tolist() == first and catalog.generation("image") == 1
        second = catalog.write_images([_row(i) for i in range(3, 6)], [])
        assert catalog.ids("image").tolist() == first + second
        pg_server.terminate(url)  # between two reads: the next one reconnects by itself
        assert catalog.count("image") == 6
    with pytest.raises(CatalogError) as caught:
        Catalog.open(url.replace("/t", "/missing_t", 1))
    assert str(caught.value).startswith("cannot open catalog postgresql+psycopg://mmsearch@/missing_t")
    assert "\n" not in str(caught.value)


def test_one_writer_per_catalog_on_postgres(pg_server):
    import os

    from mmsearch.errors import HomeLockedError

    url = pg_server.new_database()
    with Catalog.open(url) as one, Catalog.open(url) as other:
        with one.writer_lock():
            with pytest.raises(HomeLockedError) as caught:
                with other.writer_lock():
                    pass
            assert f"is being written by pid {os.getpid()} on " in str(caught.value)
            assert str(caught.value).endswith("; wait for it to finish")
        with other.writer_lock():  # released when the first writer is done
            pass
