"""Store stage: the catalog, the source of truth for what every vector is.

Its tables are in :mod:`mmsearch.schema`, how vectors are stored in
:mod:`mmsearch.codecs`, and what is particular to one database behind a
:class:`CatalogBackend`: SQLite's pragmas, read-only opening, background
checkpointer and path escapes in :mod:`mmsearch.sqlite_backend` (the default,
the home's own file), PostgreSQL's ``COPY``, advisory locks and path escapes
in :mod:`mmsearch.postgres_backend`. This module holds the :class:`Catalog`
and the SQL that both run. Alembic migrations in ``migrations/``
are applied when the catalog opens. Vectors live here too, so the FAISS index
can always be rebuilt from the catalog alone: float16 blobs in catalogs made
since revision 0004 (half the bytes; cosine scores of 512-d unit vectors move
by under 1e-4), float32 in older ones. The ``vector_dtype`` meta key says
which; callers hand the catalog numpy vectors of any float dtype and get
float32 back, and :meth:`Catalog.stored` gives the values a rebuilt index
will hold.
"""

from __future__ import annotations

import json
import operator
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from itertools import repeat
from pathlib import Path
from typing import Any, ContextManager, Protocol

import numpy as np
from sqlalchemy import (
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from mmsearch.codecs import CAST_BLOCK, VECTOR_DTYPES, from_blobs, path_from_db, path_to_db, row_views
from mmsearch.errors import CatalogError, ReadOnlyHomeError
from mmsearch.schema import KINDS, TABLES, ImageRow, ImageState, Kind, Meta, SkippedRow, TextRow
from mmsearch.sqlite_backend import SQLiteBackend, make_engine, read_only_error

__all__ = [
    "KINDS", "TABLES", "Catalog", "CatalogBackend", "ImageRow", "ImageState", "Kind", "TextRow", "catalog_exists",
    "from_blobs", "make_engine", "open_backend", "path_from_db", "path_to_db", "read_only_error", "under_any",
]


class CatalogBackend(Protocol):
    """What one kind of database underneath the catalog provides: its connection, its tricks, its locks.

    :class:`Catalog` holds one and writes only SQL that every dialect runs; the
    rest is here. :class:`mmsearch.sqlite_backend.SQLiteBackend` is the home's
    own file (pragmas, WAL checkpointer, NUL escapes in paths),
    :class:`mmsearch.postgres_backend.PostgresBackend` a PostgreSQL database
    (``COPY``, advisory locks, its own path escapes).
    """

    #: ``sqlite`` or ``postgresql``
    name: str
    engine: Engine
    #: opened read-only: every write raises :meth:`read_only_error`
    readonly: bool
    #: where the catalog is, as messages name it (a path, or a URL without its password)
    label: str
    #: a URL of the catalog that may be shown (``status``): never a password
    url: str

    def close(self) -> None: ...
    def reading(self) -> ContextManager[Connection]:
        """A connection for reads only (a server's backend spares them their transaction's round trips)."""
    def read_only_error(self) -> ReadOnlyHomeError: ...
    def committed(self) -> None:
        """A write transaction committed (SQLite checkpoints its WAL soon)."""
    def path_to_db(self, path: str) -> str:
        """The column text for a file path (every name the OS gives must round-trip)."""
    def path_from_db(self, text: str) -> str: ...
    def db_paths(self, rows: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
        """``rows`` with each ``path`` as :meth:`path_to_db` gives it (copying only the rows that change)."""
    def writer_lock(self) -> ContextManager[None]:
        """Held by a writing command: one writer per catalog, whichever home it comes from."""
    def insert_rows(
        self, conn: Connection, table: Any, rows: Sequence[dict[str, Any]], blobs: Iterable[memoryview], now: float
    ) -> list[int]:
        """Bulk-insert ``rows`` (vectors as ``blobs``) in ``conn``'s transaction; the new ids, in order."""
    def failure(self, exc: BaseException) -> str:
        """Why a statement failed, in one line."""
    def integrity_problems(self, conn: Connection) -> list[str]:
        """What the database finds wrong with itself (``check``); ``[]`` when nothing."""
    def size_bytes(self) -> int | None:
        """Bytes the catalog takes (None where that cannot be told)."""


def open_backend(where: Path | str, *, create: bool = True) -> CatalogBackend:
    """The backend of the catalog at ``where``: a SQLite file's path, or a ``postgresql+psycopg://`` URL."""
    if isinstance(where, str) and where.startswith("postgresql"):
        from mmsearch.postgres_backend import PostgresBackend

        return PostgresBackend.open(where, create=create)
    return SQLiteBackend.open(Path(where), create=create)


def catalog_exists(where: Path | str) -> bool:
    """Whether there is a catalog at ``where`` (a SQLite file, or a database that mmsearch has set up)."""
    if isinstance(where, str) and where.startswith("postgresql"):
        from mmsearch.postgres_backend import PostgresBackend

        return PostgresBackend.exists(where)
    return SQLiteBackend.exists(Path(where))


class Catalog:
    """The catalog of one home. Open with :meth:`open`; close when done."""

    def __init__(self, backend: CatalogBackend):
        self.backend = backend
        self.engine = backend.engine
        #: where the catalog is, as messages name it
        self.label = backend.label
        #: opened read-only: the home cannot be written (see :meth:`open`)
        self.readonly = backend.readonly
        name = self.get_meta("vector_dtype") or "float32"
        if name not in VECTOR_DTYPES:
            raise CatalogError(f"{self.label}: unknown vector_dtype {name!r} (written by a newer mmsearch?)")
        #: how this catalog stores vectors (see the module docstring)
        self.vector_dtype_name = name
        self.vector_dtype = VECTOR_DTYPES[name]

    def stored(self, vectors: np.ndarray) -> np.ndarray:
        """``vectors`` as the catalog keeps them, in its dtype: the values a rebuilt index will hold.

        The pipeline casts each batch once, here, and hands the result both to
        the FAISS index (which takes any float dtype) and to :meth:`write_images`
        or :meth:`write_texts`, which then store the rows without another cast.
        """
        return np.asarray(vectors, dtype=self.vector_dtype)

    def _blobs(self, rows: Sequence[dict[str, Any]]) -> Iterator[memoryview]:
        """The blobs of the rows' ``vector`` arrays, in order: views of blocks in the catalog's dtype.

        Both drivers bind any buffer as a blob, so no row is copied. Rows that are
        already in the catalog's dtype (see :meth:`stored`) are copied block by
        block; others are cast, a block at a time, as the database takes the rows.
        """
        vectors = list(map(operator.itemgetter("vector"), rows))
        if not all(map(isinstance, vectors, repeat(np.ndarray))):
            raise TypeError("catalog rows hold their vector as a numpy array")
        return (
            view
            for start in range(0, len(vectors), CAST_BLOCK)
            for view in row_views(self.stored(vectors[start:start + CAST_BLOCK]))
        )

    @classmethod
    def open(cls, where: Path | str, *, create: bool = True) -> "Catalog":
        """Open (and migrate to head) the catalog at ``where``: a SQLite file, or a PostgreSQL URL.

        A SQLite catalog this process cannot write (read-only media, someone
        else's folder) is opened read-only: reads work, every write raises
        :class:`ReadOnlyHomeError`.
        """
        backend = open_backend(where, create=create)
        try:
            return cls(backend)
        except BaseException:
            backend.close()
            raise

    def close(self) -> None:
        self.backend.close()

    def writer_lock(self) -> ContextManager[None]:
        """One writer at a time on this catalog, whichever home (machine) it comes from."""
        if self.readonly:
            raise self.backend.read_only_error()
        return self.backend.writer_lock()

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        """A connection for reads; a failure of the database (a lost server) is one :class:`CatalogError` line."""
        try:
            with self.backend.reading() as conn:
                yield conn
        except (DBAPIError, sqlite3.Error) as exc:
            raise CatalogError(f"cannot read catalog {self.label}: {self.backend.failure(exc)}") from None

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """One write transaction; a failure of the database (disk full, I/O error, a lost server)
        rolls it back and becomes a one-line :class:`CatalogError` naming the catalog."""
        if self.readonly:
            raise self.backend.read_only_error()
        try:
            with self.engine.begin() as conn:
                yield conn
        except (DBAPIError, sqlite3.Error) as exc:
            message = self.backend.failure(exc)
            raise CatalogError(f"cannot write to catalog {self.label}: {message}; nothing was changed") from None
        self.backend.committed()

    def transaction(self) -> AbstractContextManager[Connection]:
        """One write transaction for SQL kept in another module (mmsearch.staging), failing as every write here does."""
        return self._writing()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta ---------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._reading() as conn:
            return conn.execute(select(Meta.value).where(Meta.key == key)).scalar_one_or_none()

    def set_meta(self, values: dict[str, str]) -> None:
        with self._writing() as conn:
            for key, value in values.items():
                conn.execute(delete(Meta).where(Meta.key == key))
                conn.execute(insert(Meta).values(key=key, value=value))

    def generation(self, kind: Kind) -> int:
        """A counter bumped by every change to a kind's vectors; FAISS sidecars record it."""
        return int(self.get_meta(f"generation.{kind}") or 0)

    # -- images -------------------------------------------------------------

    def image_states(self, prefixes: Iterable[str] | None = None) -> dict[str, ImageState]:
        """Every catalogued image (under ``prefixes`` if given), in one query.

        Through the driver's cursor: SQLAlchemy's result rows cost ~1 µs each,
        and this runs over the whole catalog on every ``index``.
        """
        with self._reading() as conn:
            cursor = conn.connection.cursor()
            try:
                rows = cursor.execute("SELECT path, id, size, mtime_ns, content_hash FROM images").fetchall()
            finally:
                cursor.close()
        from_db = self.backend.path_from_db
        states = {from_db(path): ImageState(i, size, mtime, h) for path, i, size, mtime, h in rows}
        if prefixes is None:
            return states
        inside = under_any(prefixes)
        return {p: s for p, s in states.items() if inside(p)}

    def vectors_by_hash(self, ids_by_hash: dict[str, int]) -> dict[str, tuple[np.ndarray, int, int]]:
        """``hash -> (vector, width, height)`` for each hash whose row (``ids_by_hash[hash]``) still holds it.

        Looked up by id, as hashes are not indexed (see migration 0005); a
        hash whose row has changed since the caller read its id is left out.
        """
        found: dict[str, tuple[np.ndarray, int, int]] = {}
        wanted = {i: h for h, i in ids_by_hash.items()}
        ids = list(wanted)
        with self._reading() as conn:
            for start in range(0, len(ids), 500):
                stmt = select(ImageRow.id, ImageRow.content_hash, ImageRow.vector, ImageRow.width, ImageRow.height)
                for i, h, blob, w, hgt in conn.execute(stmt.where(ImageRow.id.in_(ids[start:start + 500]))):
                    if wanted[i] == h:
                        found[h] = (np.frombuffer(blob, dtype=self.vector_dtype).astype(np.float32), w, hgt)
        return found

    def write_images(
        self,
        new: Sequence[dict[str, Any]],
        changed: Sequence[dict[str, Any]],
        removed_ids: Sequence[int] = (),
    ) -> list[int]:
        """Insert ``new`` rows, update ``changed`` rows (by ``id``), delete ``removed_ids``.

        Rows hold their ``vector`` as a numpy array. One transaction; returns
        the ids given to the new rows, in order.
        """
        now = time.time()
        new, changed = self.backend.db_paths(new), self.backend.db_paths(changed)
        with self._writing() as conn:
            if removed_ids:
                _delete_ids(conn, ImageRow, removed_ids)
            if changed:
                _update_rows(conn, ImageRow, changed, self._blobs(changed), now)
            ids = []
            if new:
                ids = self.backend.insert_rows(conn, ImageRow, new, self._blobs(new), now)
            if new or changed or removed_ids:
                _bump_generation(conn, "image")
        return ids

    def skipped_files(self, prefixes: Iterable[str]) -> dict[str, tuple[int, int, str]]:
        """``path -> (size, mtime_ns, reason)`` of remembered undecodable files under ``prefixes``."""
        inside = under_any(prefixes)
        with self._reading() as conn:
            rows = conn.execute(select(SkippedRow.path, SkippedRow.size, SkippedRow.mtime_ns, SkippedRow.reason))
            found = {self.backend.path_from_db(r[0]): (r[1], r[2], r[3]) for r in rows}
        return {p: v for p, v in found.items() if inside(p)}

    def write_skipped(self, remember: Sequence[dict[str, Any]], forget: Sequence[str]) -> None:
        """Remember undecodable files (path, size, mtime_ns, reason); forget other paths. One transaction."""
        if not remember and not forget:
            return
        to_db = self.backend.path_to_db
        paths = [to_db(p) for p in (*forget, *(row["path"] for row in remember))]
        with self._writing() as conn:
            for start in range(0, len(paths), 500):
                conn.execute(delete(SkippedRow).where(SkippedRow.path.in_(paths[start:start + 500])))
            if remember:
                conn.execute(insert(SkippedRow), [{**row, "path": to_db(row["path"])} for row in remember])

    def image_files(self) -> list[tuple[str, int, int]]:
        """``(path, size, mtime_ns)`` of every catalogued image (``check`` compares them with the disk)."""
        from_db = self.backend.path_from_db
        with self._reading() as conn:
            rows = conn.execute(select(ImageRow.path, ImageRow.size, ImageRow.mtime_ns)).all()
        return [(from_db(raw), size, mtime_ns) for raw, size, mtime_ns in rows]

    def image_paths(self, ids: Sequence[int]) -> dict[int, str]:
        from_db = self.backend.path_from_db
        return {i: from_db(p) for i, p in self._lookup(ImageRow.id, ImageRow.path, ids)}

    def image_hashes(self, ids: Sequence[int]) -> dict[int, str]:
        return dict(self._lookup(ImageRow.id, ImageRow.content_hash, ids))

    # -- texts --------------------------------------------------------------

    def text_states(self, keys: Sequence[str]) -> dict[str, tuple[int, str]]:
        """``key -> (id, text)`` for the keys already stored."""
        found: dict[str, tuple[int, str]] = {}
        with self._reading() as conn:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                stmt = select(TextRow.key, TextRow.id, TextRow.text).where(TextRow.key.in_(chunk))
                found.update({k: (i, t) for k, i, t in conn.execute(stmt)})
        return found

    def write_texts(self, new: Sequence[dict[str, Any]], changed: Sequence[dict[str, Any]]) -> list[int]:
        """Like :meth:`write_images`, for texts (rows keyed by ``key``)."""
        now = time.time()
        with self._writing() as conn:
            if changed:
                _update_rows(conn, TextRow, changed, self._blobs(changed), now)
            ids = []
            if new:
                ids = self.backend.insert_rows(conn, TextRow, new, self._blobs(new), now)
            if new or changed:
                _bump_generation(conn, "text")
        return ids

    def texts_by_id(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        with self._reading() as conn:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start:start + 500])
                stmt = select(TextRow.id, TextRow.key, TextRow.text, TextRow.meta).where(TextRow.id.in_(chunk))
                for i, key, text, meta in conn.execute(stmt):
                    out[i] = {"key": key, "text": text, "meta": json.loads(meta) if meta else None}
        return out

    def iter_texts(self, chunk: int = 20000) -> Iterator[list[tuple[int, str]]]:
        """All ``(id, text)`` rows, in id order, ``chunk`` rows at a time."""
        last = -1
        with self._reading() as conn:
            while True:
                stmt = select(TextRow.id, TextRow.text).where(TextRow.id > last).order_by(TextRow.id).limit(chunk)
                rows = [(int(i), str(t)) for i, t in conn.execute(stmt)]
                if not rows:
                    return
                yield rows
                last = rows[-1][0]

    # -- both ---------------------------------------------------------------

    def count(self, kind: Kind) -> int:
        table = TABLES[kind]
        with self._reading() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

    def integrity_problems(self) -> list[str]:
        """What the database finds wrong with itself (SQLite's ``quick_check``); ``[]`` when nothing."""
        with self._reading() as conn:
            return self.backend.integrity_problems(conn)

    def count_bad_vectors(self, kind: Kind, dim: int) -> int:
        """How many rows of ``kind`` hold a vector blob that is not ``dim`` values of the catalog's dtype."""
        table = TABLES[kind]
        size = dim * self.vector_dtype.itemsize
        with self._reading() as conn:
            return int(conn.execute(
                select(func.count()).select_from(table).where(func.length(table.vector) != size)
            ).scalar_one())

    def ids(self, kind: Kind) -> np.ndarray:
        table = TABLES[kind]
        with self._reading() as conn:
            return np.fromiter(conn.execute(select(table.id).order_by(table.id)).scalars(), dtype=np.int64)

    def iter_vectors(self, kind: Kind, dim: int, chunk: int = 20000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All ``(ids, vectors)`` of a kind, in id order, ``chunk`` rows at a time."""
        table = TABLES[kind]
        last = -1
        with self._reading() as conn:
            while True:
                stmt = select(table.id, table.vector).where(table.id > last).order_by(table.id).limit(chunk)
                rows = conn.execute(stmt).all()
                if not rows:
                    return
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                yield ids, from_blobs([r[1] for r in rows], dim, self.vector_dtype)
                last = int(ids[-1])

    def sample_ids(self, kind: Kind, n: int, seed: int = 0) -> np.ndarray:
        """Up to ``n`` ids of ``kind``, drawn at random but the same for the same catalog state; sorted.

        Drawn among the numbers up to the largest id and looked up, rather than
        listing every id: that reads the whole table (~0.2 s at 100k images).
        """
        table = TABLES[kind]
        with self._reading() as conn:
            top = int(conn.execute(select(func.max(table.id))).scalar_one() or 0)
            total = int(conn.execute(select(func.count()).select_from(table)).scalar_one())
            if total == 0:
                return np.zeros(0, dtype=np.int64)
            want = top if total <= n else min(top, int(n * top / total * 1.25) + 32)
            drawn = np.random.default_rng(seed).choice(np.arange(1, top + 1), want, replace=False)
            found: list[int] = []
            for start in range(0, len(drawn), 500):
                chunk = [int(i) for i in drawn[start:start + 500]]
                found.extend(conn.execute(select(table.id).where(table.id.in_(chunk))).scalars())
        ids = np.array(found, dtype=np.int64)
        if len(ids) > n:
            ids = np.random.default_rng(seed).choice(ids, n, replace=False)
        return np.sort(ids)

    def vectors(self, kind: Kind, ids: Sequence[int], dim: int) -> dict[int, np.ndarray]:
        table = TABLES[kind]
        out: dict[int, np.ndarray] = {}
        for i, blob in self._lookup(table.id, table.vector, ids):
            out[i] = from_blobs([blob], dim, self.vector_dtype)[0]
        return out

    def _lookup(self, key_col: Any, value_col: Any, ids: Sequence[int]) -> list[tuple[Any, Any]]:
        rows: list[tuple[Any, Any]] = []
        with self._reading() as conn:
            for start in range(0, len(ids), 500):
                chunk = [int(i) for i in ids[start:start + 500]]
                rows.extend((k, v) for k, v in conn.execute(select(key_col, value_col).where(key_col.in_(chunk))))
        return rows


def _update_rows(
    conn: Any, table: Any, rows: Sequence[dict[str, Any]], blobs: Iterable[memoryview], now: float
) -> None:
    """Update each row by its ``id`` (vectors as ``blobs``, indexed at ``now``).

    A Core ``update(table)`` with a list of rows but no WHERE clause updates
    *every* row (setting ``id`` too); only the ORM session adds the primary key
    clause by itself. So the WHERE is explicit here.
    """
    stmt = update(table).where(table.id == bindparam("row_id"))
    conn.execute(
        stmt,
        [
            {"row_id": row["id"], **{k: v for k, v in row.items() if k != "id"}, "vector": blob, "indexed_at": now}
            for row, blob in zip(rows, blobs)
        ],
    )


def _delete_ids(conn: Any, table: Any, ids: Sequence[int]) -> None:
    ids = [int(i) for i in ids]
    for start in range(0, len(ids), 500):
        conn.execute(delete(table).where(table.id.in_(ids[start:start + 500])))


def _bump_generation(conn: Any, kind: Kind) -> None:
    key = f"generation.{kind}"
    current = conn.execute(select(Meta.value).where(Meta.key == key)).scalar_one_or_none()
    value = str(int(current or 0) + 1)
    if current is None:
        conn.execute(insert(Meta).values(key=key, value=value))
    else:
        conn.execute(update(Meta).where(Meta.key == key).values(value=value))


def under_any(roots: Iterable[str]) -> Callable[[str], bool]:
    """A test of whether a path is one of ``roots`` or inside one (at a folder boundary, either separator)."""
    roots = tuple(roots)
    exact = frozenset(roots)
    prefixes = tuple(root.rstrip("/\\") + sep for root in roots for sep in ("/", "\\"))
    return lambda path: path in exact or path.startswith(prefixes)
