"""A throwaway PostgreSQL cluster for the tests: initdb in a temporary folder, a Unix socket there,
no TCP, run as a user that is not root (initdb refuses root), stopped at the end of the session.

Without server binaries the PostgreSQL tests skip, unless MMSEARCH_REQUIRE_POSTGRES is set
(CI sets it: there they must run).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

REQUIRE_ENV = "MMSEARCH_REQUIRE_POSTGRES"
USER = "mmsearch"


def find_bin() -> Path | None:
    """The folder of ``initdb``/``pg_ctl``: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(candidates[-1]).parent if candidates else None


class Server:
    """One running cluster; :meth:`new_database` gives each test a database of its own."""

    def __init__(self, bindir: Path, folder: Path, run_as: dict[str, Any]):
        self.bindir = bindir
        self.folder = folder
        self.data = folder / "data"
        self.log = folder / "server.log"
        self._run_as = run_as
        self._numbers = itertools.count(1)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bindir / args[0]), *args[1:]], check=check, capture_output=True, text=True,
            timeout=120, **self._run_as,
        )

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync")

    def start(self, fsync: bool = False) -> None:
        """Start the server; without ``fsync`` (the tests' default) commits do not wait for the disk."""
        options = f"-k {self.folder} -c listen_addresses='' -c max_connections=200" + ("" if fsync else " -F")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{USER}@/{database}?host={self.folder}"

    def admin(self) -> Any:
        import psycopg

        return psycopg.connect(host=str(self.folder), user=USER, dbname="postgres", autocommit=True)

    def new_database(self) -> str:
        """A fresh, empty database's URL."""
        name = f"t{os.getpid()}_{next(self._numbers)}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def terminate(self, url: str) -> int:
        """Cut every connection to the database of ``url`` (as a server restart would); how many were cut."""
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        with self.admin() as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchall()
        return len(rows)


def _not_root() -> dict[str, Any]:
    """``subprocess`` arguments that run the server binaries as a user other than root."""
    if os.geteuid() != 0:
        return {}
    try:
        user = pwd.getpwnam("nobody")
    except KeyError:
        unavailable("the tests run as root (initdb refuses root) and there is no user 'nobody' to run it as")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def unavailable(reason: str) -> None:
    if os.environ.get(REQUIRE_ENV):
        pytest.fail(f"PostgreSQL is required here ({REQUIRE_ENV} is set) but {reason}")
    pytest.skip(f"no PostgreSQL server for the tests: {reason} (install Debian's `postgresql` package)")


def start_server(fsync: bool = False) -> Server:
    """A running throwaway cluster, or a skip (a failure where PostgreSQL is required)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg is not installed (pip install 'psycopg[binary]')")
    bindir = find_bin()
    if bindir is None:
        unavailable("initdb is not on PATH or in /usr/lib/postgresql/*/bin")
    run_as = _not_root()
    folder = Path(tempfile.mkdtemp(prefix="mmsearch-pg-"))
    if run_as:
        os.chown(folder, run_as["user"], run_as["group"])
    server = Server(bindir, folder, run_as)
    try:
        server.init()
        server.start(fsync)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        shutil.rmtree(folder, ignore_errors=True)
        unavailable(f"the cluster would not start: {detail.strip().splitlines()[-1] if detail.strip() else exc}")
    return server


def remove(server: Server) -> None:
    server.stop("immediate")
    shutil.rmtree(server.folder, ignore_errors=True)
