"""SQLite underneath the catalog: connection pragmas, read-only opening, a background WAL checkpointer."""

from __future__ import annotations

import errno
import os
import sqlite3
import threading
import urllib.parse
from pathlib import Path
from typing import Any

from sqlalchemy import (
    create_engine,
    event,
)
from sqlalchemy.engine import Engine

from mmsearch.errors import ReadOnlyHomeError


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
