"""SQLite underneath the catalog: connection pragmas, read-only opening, a background WAL checkpointer,
and the bulk insert that knows SQLite's id sequence; :class:`SQLiteBackend` bundles them for
:class:`mmsearch.store.Catalog`."""

from __future__ import annotations

import errno
import operator
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    create_engine,
    event,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from mmsearch.codecs import path_from_db, path_to_db, with_db_paths
from mmsearch.errors import CatalogError, ReadOnlyHomeError
from mmsearch.schema import ImageRow


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
    # checkpointer thread (see Checkpointer); a commit copies them itself
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


def if_disk_full(folder: Path) -> str:
    """A hint for SQLite's vague "disk I/O error": the folder's disk has (almost) no room left."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return ""
    return " (its disk is full: free some space)" if st.f_bavail * st.f_frsize < (1 << 20) else ""


class Checkpointer:
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


class SQLiteBackend:
    """The catalog in one SQLite file of the home (the default): see :class:`mmsearch.store.CatalogBackend`."""

    name = "sqlite"

    def __init__(self, engine: Engine, path: Path, *, readonly: bool = False):
        self.engine = engine
        self.path = path
        self.readonly = readonly
        self.label = str(path)
        self.url = f"sqlite:///{path}"
        #: copies commits from the WAL into the database file in the background
        self.checkpointer = Checkpointer(path)

    @classmethod
    def open(cls, path: Path, *, create: bool = True) -> "SQLiteBackend":
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
                reason += if_disk_full(path.parent)
            raise CatalogError(f"cannot open catalog {path}: {reason}") from None
        return cls(engine, path, readonly=readonly)

    @staticmethod
    def exists(path: Path) -> bool:
        return path.exists()

    def close(self) -> None:
        self.checkpointer.close()
        self.engine.dispose()

    def reading(self) -> Connection:
        return self.engine.connect()

    def read_only_error(self) -> ReadOnlyHomeError:
        return read_only_error(self.path.parent)

    def committed(self) -> None:
        self.checkpointer.poke()

    path_to_db = staticmethod(path_to_db)
    path_from_db = staticmethod(path_from_db)
    db_paths = staticmethod(with_db_paths)

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """Nothing to take: the catalog is the home's file, and the home's write lock covers it."""
        yield

    def insert_rows(
        self, conn: Connection, table: Any, rows: Sequence[dict[str, Any]], blobs: Iterable[memoryview], now: float
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

    def failure(self, exc: BaseException) -> str:
        """Why a statement failed, in one line (with a hint when the disk is full)."""
        return str(getattr(exc, "orig", None) or exc).splitlines()[0]

    def integrity_problems(self, conn: Connection) -> list[str]:
        """What SQLite's ``quick_check`` finds wrong in the file (nothing: ``[]``)."""
        result = [r[0] for r in conn.execute(text("PRAGMA quick_check"))]
        return [] if result == ["ok"] else [f"SQLite quick_check: {'; '.join(result[:3])}"]

    def size_bytes(self) -> int:
        """Bytes of the catalog file and its WAL sidecars."""
        files = [self.path, *self.path.parent.glob(f"{self.path.name}-*")]
        return sum(p.stat().st_size for p in files if p.exists())
