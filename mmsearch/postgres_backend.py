"""PostgreSQL underneath the catalog: a database that the homes of several machines share.

The same models and Alembic migrations as SQLite; what differs is here. Bulk
inserts reserve their ids from the table's sequence and stream the rows with
binary ``COPY`` (vectors as ``bytea``). One writer at a time holds an advisory
lock on a connection of its own, so two ``index`` runs on different machines
cannot interleave their transactions; a second one is told who writes. Text
columns cannot hold NUL or bytes that are not UTF-8, so file paths get escapes
of their own (see :func:`path_to_db`). A lost connection (a server restart,
a terminated backend) fails the statement it hit as one line; each
transaction is all or nothing, and the pool reconnects for the next run.
"""

from __future__ import annotations

import operator
import os
import re
import socket
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from mmsearch.errors import CatalogError, HomeLockedError, ReadOnlyHomeError
from mmsearch.settings import url_without_password

#: The advisory lock keys (``pg_advisory_lock(int4, int4)``): "mmsr" and what is locked.
LOCK_CLASS = 0x6D6D7372
WRITER_LOCK = 1
MIGRATION_LOCK = 2

#: Seconds to wait for a server to answer a connection, so an unreachable one fails as one line.
CONNECT_TIMEOUT = 10


# -- file paths in the catalog ------------------------------------------------
# Python shows the bytes of a file name that are not UTF-8 as lone surrogates
# (U+DC80..U+DCFF); PostgreSQL text holds neither those nor NUL. Each such
# character, and the escape character itself, is stored as SOH (U+0001) and
# two hex digits: ``\x01`` + ``80``..``ff`` a byte, ``00`` NUL, ``01`` SOH.
# Every other path, all of UTF-8 without SOH, is stored unchanged.
_ESCAPE = "\x01"
_ESCAPED = re.compile("\x01([0-9a-f]{2})")


def _plain(path: str) -> bool:
    return "\x00" not in path and _ESCAPE not in path and (path.isascii() or not _has_surrogates(path))


def _has_surrogates(path: str) -> bool:
    try:
        path.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _escape(char: str) -> str:
    if "\udc80" <= char <= "\udcff":
        return f"{_ESCAPE}{ord(char) - 0xDC00:02x}"
    if char in ("\x00", _ESCAPE):
        return f"{_ESCAPE}{ord(char):02x}"
    return char


def path_to_db(path: str) -> str:
    """The catalog's text for a file path (see above)."""
    if _plain(path):
        return path
    return "".join(map(_escape, path))


def _unescape(match: re.Match[str]) -> str:
    code = int(match.group(1), 16)
    return chr(0xDC00 + code) if code >= 0x80 else chr(code)


def path_from_db(value: str) -> str:
    """The file path (as ``os`` functions take it) of the catalog's text."""
    if _ESCAPE not in value:
        return value
    return _ESCAPED.sub(_unescape, value)


def with_db_paths(rows: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
    """The rows, with each ``path`` as the catalog's text (a copy of a row only where that differs)."""
    if all(_plain(row["path"]) for row in rows):
        return rows
    return [row if _plain(row["path"]) else {**row, "path": path_to_db(row["path"])} for row in rows]


# -- the backend ----------------------------------------------------------------


def _application_name() -> str:
    """How this process shows in ``pg_stat_activity``: a second writer's message names it."""
    return f"mmsearch pid {os.getpid()} on {socket.gethostname()}"[:63]


def make_engine(url: str) -> Engine:
    """An engine on the database at ``url``; pooled connections are checked before use (a restarted server)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise CatalogError(
            "a PostgreSQL catalog needs psycopg 3: pip install 'mmsearch[postgres]' (or 'psycopg[binary]')"
        ) from None
    return create_engine(
        url, future=True, pool_pre_ping=True,
        connect_args={"application_name": _application_name(), "connect_timeout": CONNECT_TIMEOUT},
    )


def _reason(exc: BaseException) -> str:
    """The driver's first line for a failure (never the statement or its parameters)."""
    lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _lost(exc: BaseException) -> bool:
    """Whether ``exc`` means the connection to the server is gone (a restart, a terminated backend)."""
    if getattr(exc, "connection_invalidated", False):
        return True
    orig = getattr(exc, "orig", exc)
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(orig, (psycopg.errors.AdminShutdown, psycopg.errors.CrashShutdown)) or (
        isinstance(orig, psycopg.OperationalError) and orig.pgconn is not None and orig.pgconn.status != 0
    )


class PostgresBackend:
    """The catalog in a PostgreSQL database: see :class:`mmsearch.store.CatalogBackend`."""

    name = "postgresql"
    readonly = False

    def __init__(self, engine: Engine, url: str):
        self.engine = engine
        self.url = url_without_password(url)
        self.label = self.url
        self._columns: dict[str, list[tuple[str, str]]] = {}
        self._sequences: dict[str, str] = {}

    @classmethod
    def open(cls, url: str, *, create: bool = True) -> "PostgresBackend":
        """Connect to the database at ``url`` and bring its schema to head (the database must exist)."""
        from mmsearch.migrate import upgrade

        engine = make_engine(url)
        label = url_without_password(url)
        try:
            if not create and not _has_schema(engine):
                raise CatalogError(f"no catalog in {label}; run `mmsearch index` or `mmsearch add-texts` first")
            upgrade(engine, lock=lambda: advisory_lock(engine, MIGRATION_LOCK, wait=True))
        except CatalogError:
            engine.dispose()
            raise
        except DBAPIError as exc:
            engine.dispose()
            raise CatalogError(f"cannot open catalog {label}: {_reason(exc)}") from None
        return cls(engine, url)

    @staticmethod
    def exists(url: str) -> bool:
        """Whether the database at ``url`` holds a catalog (a server that cannot be reached is an error)."""
        engine = make_engine(url)
        try:
            return _has_schema(engine)
        except DBAPIError as exc:
            raise CatalogError(f"cannot open catalog {url_without_password(url)}: {_reason(exc)}") from None
        finally:
            engine.dispose()

    def close(self) -> None:
        self.engine.dispose()

    def reading(self) -> Connection:
        """A connection in autocommit: each read sees what is committed, as it would in a transaction of
        READ COMMITTED, without the round trips of BEGIN and ROLLBACK around it."""
        return self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")

    def read_only_error(self) -> ReadOnlyHomeError:
        return ReadOnlyHomeError(f"catalog {self.label} is read-only")

    def committed(self) -> None:
        """Nothing to do: the server makes a commit durable itself."""

    path_to_db = staticmethod(path_to_db)
    path_from_db = staticmethod(path_from_db)
    db_paths = staticmethod(with_db_paths)

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """The catalog's writer lock, taken at once or refused with the holder's pid and host."""
        try:
            with advisory_lock(self.engine, WRITER_LOCK, wait=False) as held:
                if not held:
                    holder = _lock_holder(self.engine, WRITER_LOCK) or "another mmsearch"
                    raise HomeLockedError(f"catalog {self.label} is being written by {holder}; wait for it to finish")
                yield
        except DBAPIError as exc:
            raise CatalogError(f"cannot lock catalog {self.label}: {self.failure(exc)}") from None

    def insert_rows(
        self, conn: Connection, table: Any, rows: Sequence[dict[str, Any]], blobs: Iterable[memoryview], now: float
    ) -> list[int]:
        """Insert ``rows`` with ids drawn from the table's sequence, by binary ``COPY``; the ids, in order.

        The ids are reserved first (``nextval`` once per row, in one query), so
        they are known without ``RETURNING`` and stay right whoever else draws
        from the sequence.
        """
        name = table.__tablename__
        columns = self._table_columns(conn, name)
        raw = conn.connection.driver_connection
        with raw.cursor() as cursor:
            cursor.execute(
                "SELECT nextval(%s::regclass) FROM generate_series(1, %s)", (self._sequence(conn, name), len(rows))
            )
            ids = sorted(i for (i,) in cursor.fetchall())
            names = [c for c, _ in columns]
            fields = [c for c in names if c not in ("id", "vector", "indexed_at")]
            values = operator.itemgetter(*fields)
            sql = f"COPY {name} ({', '.join(_quote(c) for c in [*fields, 'id', 'vector', 'indexed_at'])}) FROM STDIN (FORMAT BINARY)"
            types = dict(columns)
            with cursor.copy(sql) as copy:
                copy.set_types([*(types[c] for c in fields), types["id"], types["vector"], types["indexed_at"]])
                write = copy.write_row
                for row, i, blob in zip(rows, ids, blobs):
                    write((*values(row), i, blob, now))
        return ids

    def _table_columns(self, conn: Connection, table: str) -> list[tuple[str, str]]:
        """``(column, type name)`` of ``table`` as the server has it (binary ``COPY`` needs the exact types)."""
        if table not in self._columns:
            found = conn.execute(
                text(
                    "SELECT a.attname, t.typname FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid "
                    "WHERE a.attrelid = to_regclass(:table) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum"
                ),
                {"table": table},
            ).all()
            self._columns[table] = [(str(c), str(t)) for c, t in found]
        return self._columns[table]

    def _sequence(self, conn: Connection, table: str) -> str:
        if table not in self._sequences:
            self._sequences[table] = conn.execute(
                text("SELECT pg_get_serial_sequence(:table, 'id')"), {"table": table}
            ).scalar_one()
        return self._sequences[table]

    def failure(self, exc: BaseException) -> str:
        """Why a statement failed, in one line; a lost connection says so and what it means."""
        reason = _reason(exc)
        if _lost(exc):
            return f"lost the connection to the server ({reason})"
        return reason

    def integrity_problems(self, conn: Connection) -> list[str]:
        """Nothing to report: the server keeps its own pages consistent (``amcheck`` is the tool for more)."""
        return []

    def size_bytes(self) -> int | None:
        """Bytes of the catalog's tables and their indexes on the server."""
        with self.engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT COALESCE(SUM(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relkind = 'r' AND n.nspname = current_schema() "
                "AND c.relname IN ('meta', 'images', 'texts', 'skipped', 'alembic_version')"
            )).scalar_one())


def _quote(column: str) -> str:
    return '"' + column.replace('"', '""') + '"'


def _has_schema(engine: Engine) -> bool:
    with engine.connect() as conn:
        return conn.execute(text("SELECT to_regclass('alembic_version') IS NOT NULL")).scalar_one()


@contextmanager
def advisory_lock(engine: Engine, key: int, *, wait: bool) -> Iterator[bool]:
    """Hold the advisory lock ``key`` on a connection of its own for the ``with`` block.

    With ``wait``, blocks until it is free and yields True; else yields whether
    it was free. The lock goes with the connection: a killed process, or a
    lost connection, releases it.
    """
    conn = engine.connect()
    held = False
    try:
        if wait:
            conn.execute(text("SELECT pg_advisory_lock(:c, :k)"), {"c": LOCK_CLASS, "k": key})
            held = True
        else:
            held = bool(conn.execute(text("SELECT pg_try_advisory_lock(:c, :k)"), {"c": LOCK_CLASS, "k": key}).scalar())
        conn.commit()  # the lock is the session's; no transaction stays open beside it
        yield held
    finally:
        if held:
            try:
                conn.execute(text("SELECT pg_advisory_unlock(:c, :k)"), {"c": LOCK_CLASS, "k": key})
                conn.commit()
            except DBAPIError:
                conn.invalidate()  # never back to the pool with the lock: closing the session releases it
        try:
            conn.close()
        except DBAPIError:
            pass


def _lock_holder(engine: Engine, key: int) -> str | None:
    """Who holds the advisory lock ``key``: ``mmsearch pid N on HOST`` as it named itself, else the server's pid."""
    with engine.connect() as conn:
        found = conn.execute(
            text(
                "SELECT a.application_name, l.pid FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :c AND l.objid = :k AND l.objsubid = 2 "
                "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ),
            {"c": LOCK_CLASS, "k": key},
        ).first()
    if found is None:
        return None
    name, pid = found
    if name and str(name).startswith("mmsearch pid "):
        return str(name)[len("mmsearch "):]
    return f"server process {pid}"
