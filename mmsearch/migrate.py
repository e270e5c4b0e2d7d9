"""Apply the Alembic migrations in ``migrations/`` to a catalog, from code."""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from importlib import resources
from pathlib import Path

from sqlalchemy.engine import Engine

from mmsearch.errors import CatalogError


def script_location() -> Path:
    """The migrations folder: top-level ``migrations/``, installed as ``mmsearch.migrations``."""
    source = Path(__file__).resolve().parent.parent / "migrations"
    if (source / "env.py").is_file():  # a source checkout (editable install, PYTHONPATH)
        return source
    return Path(str(resources.files("mmsearch.migrations")))


def alembic_config(engine: Engine | None = None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    if engine is not None:
        # the ini format interpolates %: a URL's escapes (a socket folder, %2F) are doubled
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


_REVISION = re.compile(r"^(down_revision|revision)\s*=\s*['\"]?(\w+)['\"]?\s*$", re.M)


def _head_from_files() -> str | None:
    """The head revision read straight from the version files, or None if that is not clear-cut.

    Importing Alembic costs most of a second; an unchanged re-index should not pay it.
    """
    revisions, parents = set(), set()
    for path in (script_location() / "versions").glob("*.py"):
        found = dict((k, v) for k, v in _REVISION.findall(path.read_text(encoding="utf-8")))
        if "revision" in found:
            revisions.add(found["revision"])
            if found.get("down_revision") not in (None, "None"):
                parents.add(found["down_revision"])
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def _current_from_table(engine: Engine) -> str | None:
    from sqlalchemy import text
    from sqlalchemy.exc import OperationalError, ProgrammingError

    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except (OperationalError, ProgrammingError):  # no such table: a new catalog (SQLite says one, PostgreSQL the other)
        return None


def needs_upgrade(engine: Engine) -> bool:
    """Whether the catalog's schema is older than this mmsearch's (reads only; for read-only catalogs)."""
    files_head = _head_from_files()
    if files_head is not None and _current_from_table(engine) == files_head:
        return False
    return current_revision(engine) != head_revision()


def upgrade(engine: Engine, lock: Callable[[], AbstractContextManager[object]] | None = None) -> None:
    """Bring the catalog to the newest schema; a no-op (one query, no Alembic import) when it is there.

    ``lock`` makes a migration exclusive among the processes that open the
    catalog; by default a file beside a SQLite catalog (a server's backend
    passes its own).
    """
    files_head = _head_from_files()
    if files_head is not None and _current_from_table(engine) == files_head:
        return
    head = head_revision()
    if current_revision(engine) == head:
        return
    with (lock or (lambda: _migration_lock(engine)))():
        # two processes opening a new catalog at once (an `index` and a `search`):
        # the second waits here, then finds the work done
        current = current_revision(engine)
        if current != head:
            _upgrade(engine, current)


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """An exclusive lock (a file beside a SQLite catalog) for the time of a migration.

    Only for SQLite: a server's database is no file here, and its backend passes its own lock.
    """
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    fd = os.open(f"{database}-migrate.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _upgrade(engine: Engine, current: str | None) -> None:
    from alembic import command
    from alembic.script import ScriptDirectory

    cfg = alembic_config(engine)
    known = {rev.revision for rev in ScriptDirectory.from_config(cfg).walk_revisions()}
    if current is not None and current not in known:
        raise CatalogError(
            f"catalog {engine.url.database} has schema {current}, newer than this mmsearch knows; upgrade mmsearch"
        )
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
