"""Store stage: the SQLite catalog, the source of truth for what every vector is.

Tables are typed SQLAlchemy 2 models; Alembic migrations in ``migrations/``
are applied when the catalog opens. Vectors live here too, so the FAISS index
can always be rebuilt from the catalog alone: float16 blobs in catalogs made
since revision 0004 (half the bytes; cosine scores of 512-d unit vectors move
by under 1e-4), float32 in older ones. The ``vector_dtype`` meta key says
which; callers hand the catalog numpy vectors of any float dtype and get
float32 back, and :meth:`Catalog.stored` gives the values a rebuilt index
will hold.
"""

from __future__ import annotations

import errno
import json
import operator
import os
import re
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import repeat
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
from sqlalchemy import (
    LargeBinary,
    MetaData,
    bindparam,
    String,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from mmsearch.errors import CatalogError, ReadOnlyHomeError

Kind = Literal["image", "text"]
KINDS: tuple[Kind, ...] = ("image", "text")

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Meta(Base):
    """Key/value facts about the home: model spec, vector dimension, generation."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String, primary_key=True)
    value: Mapped[str] = mapped_column(String)


class ImageRow(Base):
    """One indexed image file; ``id`` is its FAISS id."""

    __tablename__ = "images"
    # ids are never reused, so a stale FAISS entry can never point at a new file
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    path: Mapped[str] = mapped_column(String, unique=True)
    size: Mapped[int]
    mtime_ns: Mapped[int]
    # not indexed: random keys made every bulk insert rewrite the index (migration 0005)
    content_hash: Mapped[str] = mapped_column(String)
    width: Mapped[int]
    height: Mapped[int]
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    indexed_at: Mapped[float]


class TextRow(Base):
    """One text of a corpus; ``id`` is its FAISS id, ``key`` the user's id."""

    __tablename__ = "texts"
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String, unique=True)
    text: Mapped[str] = mapped_column(String)
    source: Mapped[str] = mapped_column(String)
    meta: Mapped[str | None] = mapped_column(String, nullable=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)
    indexed_at: Mapped[float]


class SkippedRow(Base):
    """A file that could not be decoded, remembered so an unchanged one is not read again."""

    __tablename__ = "skipped"

    path: Mapped[str] = mapped_column(String, primary_key=True)
    size: Mapped[int]
    mtime_ns: Mapped[int]
    reason: Mapped[str] = mapped_column(String)


TABLES: dict[Kind, type[ImageRow] | type[TextRow]] = {"image": ImageRow, "text": TextRow}


class ImageState(NamedTuple):
    """What the catalog knows of a file, enough to tell whether it changed.

    A named tuple: the unchanged check builds one per catalogued file, and a
    frozen dataclass cost ~5x as much to make.
    """

    id: int
    size: int
    mtime_ns: int
    content_hash: str


#: How a catalog may store its vectors (``meta.vector_dtype``), as little-endian numpy dtypes.
VECTOR_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


#: Rows a write converts to the catalog's dtype at a time (see :meth:`Catalog._blobs`).
_CAST_BLOCK = 1024


def _row_views(block: np.ndarray) -> Iterator[memoryview]:
    """Each row of a C-contiguous 2-d array as a view of its bytes."""
    data, width = memoryview(block).cast("B"), block.itemsize * block.shape[1]
    for start in range(0, len(data), width):
        yield data[start:start + width]


def from_blobs(blobs: Sequence[bytes], dim: int, dtype: np.dtype = VECTOR_DTYPES["float32"]) -> np.ndarray:
    """``(len(blobs), dim)`` float32 vectors from blobs of ``dtype`` values."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    size = dim * np.dtype(dtype).itemsize
    bad = sum(len(blob) != size for blob in blobs)
    if bad:
        raise CatalogError(
            f"{bad} stored vectors are not {dim} {np.dtype(dtype).name} values: the catalog is damaged "
            "(`mmsearch check` reports it)"
        )
    return np.frombuffer(b"".join(blobs), dtype=dtype).reshape(len(blobs), dim).astype(np.float32)


# -- file paths in the catalog ------------------------------------------------
# A POSIX file name is bytes; Python shows the bytes that are not UTF-8 as lone
# surrogates (U+DC80..U+DCFF), which SQLite text cannot hold. The catalog stores
# each such byte as NUL + two hex digits: NUL never occurs in a path, so the
# mapping is reversible, and every UTF-8 path is stored unchanged.
_ESCAPED_BYTE = re.compile("\x00([0-9a-f]{2})")


def path_to_db(path: str) -> str:
    """The catalog's text for a file path (see above)."""
    if path.isascii():  # the common case, and a constant-time check
        return path
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "".join(f"\x00{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else c for c in path)


def path_from_db(text: str) -> str:
    """The file path (as ``os`` functions take it) of the catalog's text."""
    if "\x00" not in text:
        return text
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)


_PATH, _VECTOR = operator.itemgetter("path"), operator.itemgetter("vector")


def _with_db_paths(rows: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
    """The rows, with each ``path`` as the catalog's text (a copy of a row only where that differs)."""
    if all(map(str.isascii, map(_PATH, rows))):  # the common case, ~30 ns a row
        return rows
    return [row if path_to_db(row["path"]) is row["path"] else {**row, "path": path_to_db(row["path"])} for row in rows]


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # Large pages keep a 2 KiB vector blob inside its row instead of overflow
    # pages: bulk inserts of 512-d rows run ~3x faster. Only takes effect when
    # the database file is created; existing catalogs keep their page size.
    cursor.execute("PRAGMA page_size=32768")
    # 64 MiB of page cache instead of SQLite's 2 MiB (62 such pages). It made
    # bulk inserts ~12% faster while content hashes were indexed; since that
    # index is gone (migration 0005) inserts run the same with 2 MiB (81-86k
    # vs 80-90k rows/s, plain sqlite3, alternating). Kept for the reads of a
    # large catalog; pages are allocated only when used.
    cursor.execute("PRAGMA cache_size=-65536")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    # A catalog's writes are copied from the WAL into the database by its
    # checkpointer thread (see _Checkpointer); a commit copies them itself
    # only once the WAL passes 256 MiB (8,192 pages of 32 KiB; SQLite's
    # default is 1,000 pages), should that thread fall behind.
    cursor.execute("PRAGMA wal_autocheckpoint=8192")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(path: Path) -> Engine:
    engine = create_engine(f"sqlite:///{path}", future=True)
    event.listen(engine, "connect", _set_sqlite_pragmas)
    return engine


#: What ``open(2)`` says where a file may not be written, though it exists.
READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def read_only_error(home: Path) -> ReadOnlyHomeError:
    """The one line a writing command gets on a home it cannot write."""
    return ReadOnlyHomeError(
        f"{home} is read-only; search, status and check work there, "
        "but index, add-texts and check --repair need a home you can write to"
    )


def may_write(path: Path) -> bool:
    """Whether this process can write the catalog at ``path`` and create files beside it.

    ``access(2)`` answers for the real user and says EROFS on read-only
    media even to root, who is otherwise allowed everything.
    """
    return os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


def make_readonly_engine(path: Path) -> Engine:
    """An engine that only reads the catalog at ``path``, on a folder it cannot write.

    A WAL database needs its ``-shm`` file, which SQLite creates on open and
    cannot where the folder is read-only: plain and ``mode=ro`` opens then fail
    with "unable to open database file". With no ``-wal``/``-shm`` left (every
    writer closed cleanly), the database file alone holds everything, and
    ``immutable=1`` reads it without those files or any locks. Where a ``-wal``
    remains (a writer still open, or killed), its commits are not in the
    database file yet, so it is read with ``mode=ro``, which uses an existing
    ``-shm`` read-only.
    """
    sidecars = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    mode = "mode=ro" if any(p.exists() for p in sidecars) else "immutable=1"
    uri = f"file:{urllib.parse.quote(os.fsencode(path))}?{mode}"
    engine = create_engine(
        f"sqlite:///{path}", future=True,
        creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False),
    )
    event.listen(engine, "connect", _set_readonly_pragmas)
    return engine


def _set_readonly_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA cache_size=-65536")  # as for writers: the reads of a large catalog
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA query_only=1")
    cursor.close()


def _if_disk_full(folder: Path) -> str:
    """A hint for SQLite's vague "disk I/O error": the folder's disk has (almost) no room left."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return ""
    return " (its disk is full: free some space)" if st.f_bavail * st.f_frsize < (1 << 20) else ""


class _Checkpointer:
    """Copies committed writes from the WAL into the database in a background thread.

    A WAL checkpoint copies pages and syncs both files; done by the commit
    that fills the WAL, it stalled every second or third bulk transaction for
    ~200 ms. In a thread of its own (on its own connection, ``PASSIVE``: it
    never blocks readers or the writer) it overlaps the next transaction:
    plain sqlite3 inserted 141-151k rows/s that way against 81-86k
    (alternating). Durability is unchanged: a commit is in the WAL either
    way, and a killed checkpoint is finished by the next one.
    """

    def __init__(self, path: Path):
        self.path = path
        self._cond = threading.Condition()
        self._asked = self._done = 0  # commits poked about, and how many of them a checkpoint followed
        self._closing = False
        self._gone = False  # the thread could not open the database: commits checkpoint by themselves
        self._thread: threading.Thread | None = None

    def poke(self) -> None:
        """A transaction committed: checkpoint soon."""
        with self._cond:
            if self._gone:
                return
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(target=self._run, name="mmsearch-checkpoint", daemon=True)
                self._thread.start()
            self._asked += 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Whether a checkpoint has followed every commit so far (waiting up to ``timeout`` seconds)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= self._asked, timeout)

    def close(self) -> None:
        with self._cond:
            thread, self._thread = self._thread, None
            self._closing = True
            self._cond.notify_all()
        if thread is not None:
            thread.join()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _run(self) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error:
            with self._cond:  # the writers' own checkpoints (wal_autocheckpoint) remain
                self._gone, self._done = True, self._asked
                self._cond.notify_all()
            return
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._closing or self._asked > self._done)
                    if self._closing:
                        return
                    target = self._asked
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass  # as above; the next commit tries again
                with self._cond:
                    self._done = target
                    self._cond.notify_all()
        finally:
            conn.close()
            with self._cond:
                self._done = self._asked  # closing: the last connection's close checkpoints the rest
                self._cond.notify_all()


class Catalog:
    """The catalog of one home. Open with :meth:`open`; close when done."""

    def __init__(self, engine: Engine, path: Path, *, readonly: bool = False):
        self.engine = engine
        self.path = path
        #: opened read-only: the home cannot be written (see :meth:`open`)
        self.readonly = readonly
        self._checkpointer = _Checkpointer(path)
        name = self.get_meta("vector_dtype") or "float32"
        if name not in VECTOR_DTYPES:
            raise CatalogError(f"{path}: unknown vector_dtype {name!r} (written by a newer mmsearch?)")
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

        sqlite3 binds any buffer as a BLOB, so no row is copied. Rows that are
        already in the catalog's dtype (see :meth:`stored`) are copied block by
        block; others are cast, a block at a time, as SQLite takes the rows.
        """
        vectors = list(map(_VECTOR, rows))
        if not all(map(isinstance, vectors, repeat(np.ndarray))):
            raise TypeError("catalog rows hold their vector as a numpy array")
        return (
            view
            for start in range(0, len(vectors), _CAST_BLOCK)
            for view in _row_views(self.stored(vectors[start:start + _CAST_BLOCK]))
        )

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> "Catalog":
        """Open (and migrate to head) the catalog at ``path``.

        A catalog this process cannot write (read-only media, someone else's
        folder) is opened read-only: reads work, every write raises
        :class:`ReadOnlyHomeError`.
        """
        from mmsearch.migrate import needs_upgrade, upgrade

        if not create and not path.exists():
            raise CatalogError(f"no catalog at {path}; run `mmsearch index` or `mmsearch add-texts` first")
        readonly = False
        try:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                if exc.errno in READ_ONLY_ERRNOS:
                    raise read_only_error(path.parent) from None
                raise
            readonly = not may_write(path)
            if readonly and not path.exists():
                raise read_only_error(path.parent)
            if readonly:
                engine = make_readonly_engine(path)
                if needs_upgrade(engine):
                    raise ReadOnlyHomeError(
                        f"{path.parent} is read-only and its catalog's schema is not this mmsearch's; "
                        "open it once where it can be written, or use the mmsearch that made it"
                    )
            else:
                engine = make_engine(path)
                upgrade(engine)
        except CatalogError:
            raise
        except (DBAPIError, OSError) as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            if readonly and Path(f"{path}-wal").exists():
                reason += f" (the home is read-only and {path.name}-wal holds writes not yet in the catalog: open it once where it can be written)"
            else:
                reason += _if_disk_full(path.parent)
            raise CatalogError(f"cannot open catalog {path}: {reason}") from None
        return cls(engine, path, readonly=readonly)

    def close(self) -> None:
        self._checkpointer.close()
        self.engine.dispose()

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """One write transaction; a failure of SQLite (disk full, I/O error) rolls it back
        and becomes a one-line :class:`CatalogError` naming the catalog."""
        if self.readonly:
            raise read_only_error(self.path.parent)
        try:
            with self.engine.begin() as conn:
                yield conn
        except (DBAPIError, sqlite3.Error) as exc:
            message = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise CatalogError(f"cannot write to catalog {self.path}: {message}; nothing was changed") from None
        self._checkpointer.poke()

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta ---------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self.engine.connect() as conn:
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
        with self.engine.connect() as conn:
            cursor = conn.connection.cursor()
            try:
                rows = cursor.execute("SELECT path, id, size, mtime_ns, content_hash FROM images").fetchall()
            finally:
                cursor.close()
        states = {path_from_db(path): ImageState(i, size, mtime, h) for path, i, size, mtime, h in rows}
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
        with self.engine.connect() as conn:
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
        new, changed = _with_db_paths(new), _with_db_paths(changed)
        with self._writing() as conn:
            if removed_ids:
                _delete_ids(conn, ImageRow, removed_ids)
            if changed:
                _update_rows(conn, ImageRow, changed, self._blobs(changed), now)
            ids = []
            if new:
                ids = _insert_rows(conn, ImageRow, new, self._blobs(new), now)
            if new or changed or removed_ids:
                _bump_generation(conn, "image")
        return ids

    def skipped_files(self, prefixes: Iterable[str]) -> dict[str, tuple[int, int, str]]:
        """``path -> (size, mtime_ns, reason)`` of remembered undecodable files under ``prefixes``."""
        inside = under_any(prefixes)
        with self.engine.connect() as conn:
            rows = conn.execute(select(SkippedRow.path, SkippedRow.size, SkippedRow.mtime_ns, SkippedRow.reason))
            found = {path_from_db(r[0]): (r[1], r[2], r[3]) for r in rows}
        return {p: v for p, v in found.items() if inside(p)}

    def write_skipped(self, remember: Sequence[dict[str, Any]], forget: Sequence[str]) -> None:
        """Remember undecodable files (path, size, mtime_ns, reason); forget other paths. One transaction."""
        if not remember and not forget:
            return
        paths = [path_to_db(p) for p in (*forget, *(row["path"] for row in remember))]
        with self._writing() as conn:
            for start in range(0, len(paths), 500):
                conn.execute(delete(SkippedRow).where(SkippedRow.path.in_(paths[start:start + 500])))
            if remember:
                conn.execute(insert(SkippedRow), [{**row, "path": path_to_db(row["path"])} for row in remember])

    def image_paths(self, ids: Sequence[int]) -> dict[int, str]:
        return {i: path_from_db(p) for i, p in self._lookup(ImageRow.id, ImageRow.path, ids)}

    def image_hashes(self, ids: Sequence[int]) -> dict[int, str]:
        return dict(self._lookup(ImageRow.id, ImageRow.content_hash, ids))

    # -- texts --------------------------------------------------------------

    def text_states(self, keys: Sequence[str]) -> dict[str, tuple[int, str]]:
        """``key -> (id, text)`` for the keys already stored."""
        found: dict[str, tuple[int, str]] = {}
        with self.engine.connect() as conn:
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
                ids = _insert_rows(conn, TextRow, new, self._blobs(new), now)
            if new or changed:
                _bump_generation(conn, "text")
        return ids

    def texts_by_id(self, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        out: dict[int, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                chunk = list(ids[start:start + 500])
                stmt = select(TextRow.id, TextRow.key, TextRow.text, TextRow.meta).where(TextRow.id.in_(chunk))
                for i, key, text, meta in conn.execute(stmt):
                    out[i] = {"key": key, "text": text, "meta": json.loads(meta) if meta else None}
        return out

    # -- both ---------------------------------------------------------------

    def count(self, kind: Kind) -> int:
        table = TABLES[kind]
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

    def ids(self, kind: Kind) -> np.ndarray:
        table = TABLES[kind]
        with self.engine.connect() as conn:
            return np.fromiter(conn.execute(select(table.id).order_by(table.id)).scalars(), dtype=np.int64)

    def iter_vectors(self, kind: Kind, dim: int, chunk: int = 20000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All ``(ids, vectors)`` of a kind, in id order, ``chunk`` rows at a time."""
        table = TABLES[kind]
        last = -1
        with self.engine.connect() as conn:
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
        with self.engine.connect() as conn:
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
        with self.engine.connect() as conn:
            for start in range(0, len(ids), 500):
                chunk = [int(i) for i in ids[start:start + 500]]
                rows.extend((k, v) for k, v in conn.execute(select(key_col, value_col).where(key_col.in_(chunk))))
        return rows


def _insert_rows(
    conn: Any, table: Any, rows: Sequence[dict[str, Any]], blobs: Iterable[memoryview], now: float
) -> list[int]:
    """Insert ``rows`` (vectors as ``blobs``, indexed at ``now``) as one executemany; their ids, in order.

    ``INSERT ... RETURNING`` with ordered results costs 3x the insert itself.
    Ids come from AUTOINCREMENT and this transaction excludes other writers,
    so the new ids are the block after the table's sequence; that is checked,
    and looked up by the unique key if it ever does not hold.
    """
    def sequence() -> int:
        found = conn.exec_driver_sql("SELECT seq FROM sqlite_sequence WHERE name = ?", (table.__tablename__,))
        return int(found.scalar() or 0)

    # The driver's executemany on plain tuples, made as SQLite takes them:
    # SQLAlchemy's per-row parameter processing, and copying each row's dict,
    # cost a third of bulk insert time, and a list of all rows would wait for
    # every vector's cast (see Catalog._blobs).
    columns = [c.name for c in table.__table__.columns if c.name not in ("id", "vector", "indexed_at")]
    quote = conn.dialect.identifier_preparer.quote
    sql = (
        f"INSERT INTO {table.__tablename__} ({', '.join(quote(c) for c in columns)}, vector, indexed_at) "
        f"VALUES ({', '.join('?' for _ in columns)}, ?, ?)"
    )
    fields = operator.itemgetter(*columns)
    before = sequence()
    cursor = conn.connection.cursor()
    try:
        cursor.executemany(sql, ((*fields(row), blob, now) for row, blob in zip(rows, blobs)))
    finally:
        cursor.close()
    after = sequence()
    if after - before == len(rows):
        return list(range(before + 1, after + 1))
    key = table.path if table is ImageRow else table.key
    values = [row[key.name] for row in rows]
    found: dict[Any, int] = {}
    for start in range(0, len(values), 500):
        stmt = select(key, table.id).where(key.in_(values[start:start + 500]))
        found.update((k, i) for k, i in conn.execute(stmt))
    return [found[v] for v in values]


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
