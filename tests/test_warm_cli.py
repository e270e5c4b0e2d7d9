"""The warm CLI: `search` and `status` through a running `mmsearch serve`, byte for byte, and the fallbacks."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmsearch import client as client_mod
from mmsearch.cli import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path):
    """One home, indexed, with one `mmsearch serve` process on it for the whole module."""
    from conftest import COLOURS, make_image

    tmp = tmp_path_factory.mktemp("warm")
    home = tmp / "home"
    photos = tmp / "photos"
    for name, colour in COLOURS.items():
        make_image(photos / f"{name} ü.png", colour)
    base = ["--home", str(home), "--model", str(tiny_model)]
    assert run(*base, "index", photos, "--quiet").exit_code == 0
    corpus = tmp / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"t{i}", "text": t}) + "\n" for i, t in enumerate(["red car", "blue sky", "grün"])))
    assert run(*base, "add-texts", corpus, "--quiet").exit_code == 0
    (photos / "white ü.png").unlink()  # a vanished file: left out of results on both paths
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mmsearch", "--home", str(home), "serve", "--port", "0"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 90
    record = None
    while time.monotonic() < deadline and proc.poll() is None:
        record = client_mod.read_record(home)
        if record is not None and client_mod.get_json(record, "/api/info") is not None:
            break
        time.sleep(0.2)
    assert record is not None and proc.poll() is None, proc.stderr.read() if proc.poll() is not None else "no record"
    yield base, home, proc, record
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


@pytest.fixture
def indexed(home: Path, tiny_model: Path, photo_dir: Path) -> list[str]:
    base = ["--home", str(home), "--model", str(tiny_model)]
    assert run(*base, "index", photo_dir, "--quiet").exit_code == 0
    return base


SEARCHES = [
    ["search", "red"],
    ["search", "red", "--json"],
    ["search", "blue thing + 2:sky - dog", "-k", "4"],
    ["search", "sky", "--texts"],
    ["search", "sky", "--texts", "--json", "-k", "2"],
    ["search", "a picture", "-k", "50", "--json"],
    ["status"],
    ["status", "--json"],
]


def test_same_output_through_the_server_byte_for_byte(served, monkeypatch):
    indexed, home, proc, record = served
    assert (home / "serve.json").stat().st_mode & 0o777 == 0o600
    served = {tuple(args): run(*indexed, *args) for args in SEARCHES}
    # no server: the same commands in-process (a record of a dead server is ignored)
    monkeypatch.setattr(client_mod, "read_record", lambda *a, **k: None)
    for args, through_server in served.items():
        alone = run(*indexed, *args)
        assert through_server.exit_code == alone.exit_code == 0
        assert through_server.stdout_bytes == alone.stdout_bytes, args
        assert through_server.stderr_bytes == alone.stderr_bytes, args


def test_the_server_is_used_and_nothing_heavy_is_imported(served):
    _, home, _, _ = served
    code = (
        "import sys; from mmsearch.cli import main; sys.argv = ['mmsearch', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'faiss', 'sqlalchemy') if m in sys.modules), file=sys.stderr)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "--home", str(home), "search", "red", "--json"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60,
    )
    assert out.returncode == 0 and out.stdout.count("\n") == 5
    assert out.stderr.strip().splitlines()[-1] == "[]"


def test_real_server_refuses_raw_traversal(served, tmp_path):
    _, _, _, record = served
    secret = tmp_path / "secret.txt"
    secret.write_text("never served")
    probes = ["/api/file/../../../../" + str(secret).lstrip("/"), "/api/file/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
              "/api/file/1%00", "/api/thumb/..%2F..%2Fetc%2Fpasswd", "/static/../server.py",
              "/static/%2e%2e/server.py", "/static/..%2Fserver.py", "/static/" + str(secret),
              "/api/file/" + str(secret), "/static//etc/passwd"]
    for path in probes:
        conn = http.client.HTTPConnection("127.0.0.1", record.port, timeout=10)
        conn.request("GET", path, headers={"Host": f"127.0.0.1:{record.port}"})
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status in (400, 404), (path, response.status)
        assert b"never served" not in body and b"root:" not in body and b"def create_app" not in body


def test_stale_records_are_ignored(indexed, home):
    alone = run(*indexed, "search", "red")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"pid": int(dead.stdout), "host": "127.0.0.1", "port": 9, "token": None, "model": "x", "int8": False, "version": "0"}
    (home / "serve.json").write_text(json.dumps(stale))
    assert run(*indexed, "search", "red").stdout_bytes == alone.stdout_bytes
    # a live pid whose port does not answer
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    (home / "serve.json").write_text(json.dumps({**stale, "pid": os.getpid(), "port": free_port}))
    started = time.monotonic()
    assert run(*indexed, "search", "red").stdout_bytes == alone.stdout_bytes
    assert time.monotonic() - started < 30
    (home / "serve.json").write_text("{not json")
    assert run(*indexed, "search", "red").stdout_bytes == alone.stdout_bytes


def test_non_loopback_host_makes_and_prints_a_token(indexed, monkeypatch):
    import mmsearch.server as server_mod

    seen = {}
    monkeypatch.setattr(server_mod, "run", lambda library, **kw: seen.update(kw))
    result = runner.invoke(app, [*indexed, "serve", "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 0, result.output
    token = seen["token"]
    assert token and len(token) >= 20 and token in result.stderr
    result = runner.invoke(app, [*indexed, "serve", "--port", "0"])
    assert seen["token"] is None  # loopback: no token unless asked for
    result = runner.invoke(app, [*indexed, "serve", "--token", "mine"])
    assert seen["token"] == "mine" and seen["host"] == "127.0.0.1" and seen["port"] == 8765


def test_shutdown_removes_the_record(served):
    """Last in this module: it stops the shared server."""
    indexed, home, proc, _ = served
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert not (home / "serve.json").exists()
    assert run(*indexed, "search", "red").exit_code == 0  # in-process again
