"""The warm path of the CLI: find a running ``mmsearch serve`` on a home, and ask it.

``serve`` records where it listens in ``HOME/serve.json``; ``mmsearch search``
and ``status`` read it and send their request there, so they answer without
importing torch or loading the model. A record whose process is gone, or a
server that does not answer, is ignored: the caller works in-process.

Only the standard library is imported here: the whole point is speed.
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RECORD_NAME = "serve.json"

#: Seconds to wait for the server to accept the connection; a live one on loopback does at once.
CONNECT_TIMEOUT = 1.0
#: Seconds to wait for an answer (a server that is still loading its model takes a while).
READ_TIMEOUT = 120.0


@dataclass(frozen=True)
class ServerRecord:
    """What ``HOME/serve.json`` says about a running server."""

    pid: int
    host: str
    port: int
    token: str | None
    model: str
    int8: bool
    version: str
    text_precision: str = "auto"

    @property
    def connect_host(self) -> str:
        """Where a client on this machine reaches it (a wildcard bind answers on loopback)."""
        return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)


def record_path(home: Path) -> Path:
    return home / RECORD_NAME


def write_record(home: Path, record: ServerRecord) -> Path:
    """Write the record atomically, readable by its owner only (it holds the token)."""
    path = record_path(home)
    home.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{RECORD_NAME}.", suffix=".tmp", dir=home)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(asdict(record), fh)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def remove_record(home: Path, pid: int) -> None:
    """Remove the record if it is still the one process ``pid`` wrote."""
    record = read_record(home, check_pid=False)
    if record is not None and record.pid == pid:
        record_path(home).unlink(missing_ok=True)


def read_record(home: Path, *, check_pid: bool = True) -> ServerRecord | None:
    """The record of a server on ``home``; ``None`` when there is none, it is unreadable or its process is gone."""
    try:
        raw = json.loads(record_path(home).read_text())
        record = ServerRecord(
            pid=int(raw["pid"]), host=str(raw["host"]), port=int(raw["port"]),
            token=raw.get("token") or None, model=str(raw["model"]), int8=bool(raw.get("int8", False)),
            version=str(raw.get("version", "")), text_precision=str(raw.get("text_precision", "auto")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if check_pid and not _alive(record.pid):
        return None
    return record


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    return True


def get_json(record: ServerRecord, path: str, params: dict[str, Any] | None = None) -> tuple[int, Any] | None:
    """``(status, decoded JSON)`` of ``GET path?params`` on the server; ``None`` if it does not answer."""
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    headers = {"Accept": "application/json", "Host": f"127.0.0.1:{record.port}"}
    if record.token:
        headers["Authorization"] = f"Bearer {record.token}"
    conn = http.client.HTTPConnection(record.connect_host, record.port, timeout=CONNECT_TIMEOUT)
    try:
        conn.connect()
        if conn.sock is not None:
            conn.sock.settimeout(READ_TIMEOUT)
        conn.request("GET", path + query, headers=headers)
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body)
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
