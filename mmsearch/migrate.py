"""Apply the Alembic migrations in ``migrations/`` to a catalog, from code."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
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
        cfg.set_main_option("sqlalchemy.url", str(engine.url))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> None:
    """Bring the catalog to the newest schema; a no-op (one query) when it is there."""
    head = head_revision()
    if current_revision(engine) == head:
        return
    with _migration_lock(engine):
        # two processes opening a new catalog at once (an `index` and a `search`):
        # the second waits here, then finds the work done
        current = current_revision(engine)
        if current != head:
            _upgrade(engine, current)


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """An exclusive lock (a file beside the catalog) for the time of a migration."""
    database = engine.url.database
    if not database or database == ":memory:":
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
