"""Full disks and read-only homes: one clear line, nothing committed lost, the next run goes on.

Write errors are injected everywhere (FAISS saves, the re-ranker's token
store); where the tests may mount a small tmpfs (root), the disk is really
filled. A read-only home is a read-only bind mount (root), and a folder that
is only not writable for the user (``chmod``) is tried in a child process
that runs without root's permission override.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import make_image
from mmsearch.check import check_home
from mmsearch.cli import app
from mmsearch.index import temp_files
from mmsearch.settings import resolve
from mmsearch.store import Catalog

runner = CliRunner()


def one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("skipped ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def picture(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    return make_image(path, tuple(int(c) for c in rng.integers(0, 256, 3)), (40, 32))


def invoke(base: list[str], *args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [*base, *args])


def ok(base: list[str], *args: str):  # type: ignore[no-untyped-def]
    result = invoke(base, *args)
    assert result.exit_code == 0, result.output
    return result


def agrees(home: Path, model: Path) -> None:
    """``mmsearch check``: catalog and indexes agree, nothing left over."""
    report = check_home(resolve(home=home, model=str(model)))
    assert report.ok and not [f for f in report.findings if f.code != "missing-files"], report.findings


def image_count(home: Path) -> int:
    with Catalog.open(home / "catalog.sqlite3", create=False) as catalog:
        return catalog.count("image")


@pytest.fixture(scope="module")
def rerank_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CLIP with an (untrained) re-ranker, so that `index` fills the token store."""
    import torch

    from conftest import save_tiny_model
    from mmsearch.rerank import CrossAttentionScorer, save_scorer

    folder = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-rerank")
    torch.manual_seed(3)
    save_scorer(CrossAttentionScorer(32), folder)
    return folder


FAISS_ENOSPC = (
    "Error in void faiss::write_index(const Index*, IOWriter*, int) at index_write.cpp:499: "
    "Error: 'ret == (size * 4)' failed: write error in {path}: 65454 != 256000 (No space left on device)"
)


def fail_faiss_writes(patch: pytest.MonkeyPatch) -> None:
    """Every FAISS save fails as it does on a full disk (the message is FAISS's own)."""
    import faiss

    def full(_index: object, path: str) -> None:
        raise RuntimeError(FAISS_ENOSPC.format(path=path))

    patch.setattr(faiss, "write_index", full)


# -- injected write errors (run everywhere) ------------------------------------


def test_index_whose_faiss_save_fails(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos, home = tmp_path / "photos", tmp_path / "home"
    base = ["--home", str(home), "--model", str(tiny_model)]
    for i in range(3):
        picture(photos / f"{i}.png", i)
    ok(base, "index", "--quiet", str(photos))
    for i in range(3, 5):
        picture(photos / f"{i}.png", i)

    with monkeypatch.context() as patch:
        fail_faiss_writes(patch)
        line = one_error_line(invoke(base, "index", "--quiet", str(photos)))
    assert line.startswith(f"error: cannot write {home / 'images.faiss'}: No space left on device;"), line
    assert image_count(home) == 5  # the batch was committed before the save
    assert temp_files(home / "images.faiss") == []

    result = ok(base, "index", "--quiet", "--json", str(photos))
    assert json.loads(result.stdout.splitlines()[-1])["unchanged"] == 5
    agrees(home, tiny_model)
    assert len(ok(base, "search", "x", "-k", "10", "--json").stdout.splitlines()) == 5


def test_check_repair_whose_faiss_save_fails(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    photos, home = tmp_path / "photos", tmp_path / "home"
    base = ["--home", str(home), "--model", str(tiny_model)]
    for i in range(3):
        picture(photos / f"{i}.png", i)
    ok(base, "index", "--quiet", str(photos))
    (home / "images.faiss").unlink()

    with monkeypatch.context() as patch:
        fail_faiss_writes(patch)
        line = one_error_line(invoke(base, "check", "--repair"))
    assert f"cannot write {home / 'images.faiss'}: No space left on device" in line
    assert temp_files(home / "images.faiss") == []

    assert "repaired: rebuilt images.faiss" in ok(base, "check", "--repair").stdout
    agrees(home, tiny_model)


def test_add_texts_whose_faiss_save_fails(tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    base = ["--home", str(home), "--model", str(tiny_model)]
    corpus = tmp_path / "texts.txt"
    corpus.write_text("".join(f"text number {i}\n" for i in range(20)))

    with monkeypatch.context() as patch:
        fail_faiss_writes(patch)
        line = one_error_line(invoke(base, "add-texts", "--quiet", str(corpus)))
    assert f"cannot write {home / 'texts.faiss'}: No space left on device" in line

    result = ok(base, "add-texts", "--quiet", "--json", str(corpus))
    assert json.loads(result.stdout)["unchanged"] == 20  # the texts were committed before the save
    agrees(home, tiny_model)


class _FullFile:
    """A file whose writes stop after ``room`` bytes with ENOSPC, as on a full disk."""

    def __init__(self, fh, room: int):  # type: ignore[no-untyped-def]
        self._fh, self._room = fh, room

    def write(self, data):  # type: ignore[no-untyped-def]
        if len(data) > self._room:
            self._fh.write(data[: self._room])
            self._fh.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._fh.write(data)

    def __getattr__(self, name):  # type: ignore[no-untyped-def]
        return getattr(self._fh, name)

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        self._fh.close()


@pytest.mark.parametrize("victim", ["tokens.f16", "tokens.hashes"])
def test_index_whose_token_store_write_fails(
    victim: str, tmp_path: Path, rerank_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins

    import mmsearch.rerank as rerank

    photos, home = tmp_path / "photos", tmp_path / "home"
    base = ["--home", str(home), "--model", str(rerank_model), "--workers", "0"]
    for i in range(3):
        picture(photos / f"{i}.png", i)
    ok(base, "index", "--quiet", str(photos))
    for i in range(3, 6):
        picture(photos / f"{i}.png", i)
    hashes = home / "rerank" / "tokens.hashes"
    listed = hashes.read_bytes()

    def opened(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        fh = builtins.open(file, *args, **kwargs)
        return _FullFile(fh, room=10) if Path(file).name == victim else fh

    with monkeypatch.context() as patch:
        patch.setattr(rerank, "open", opened, raising=False)
        line = one_error_line(invoke(base, "index", "--quiet", str(photos)))
    assert line.startswith(f"error: cannot write {home / 'rerank' / victim}: No space left on device;"), line
    assert hashes.read_bytes() == listed  # a partly written list is cut back
    assert image_count(home) == 3  # the failed batch is not in the catalog either

    result = ok(base, "index", "--quiet", "--json", str(photos))
    assert json.loads(result.stdout.splitlines()[-1])["added"] == 3
    agrees(home, rerank_model)
    store = rerank.TokenStore.open(home, f"local-dir:{rerank_model}")
    assert store is not None and len(store.rows) == 6
    assert hashes.read_text().count("\n") == 6 and all(len(h) > 16 for h in hashes.read_text().split())
    # every row holds its own image's tokens: the re-ranked search runs on the stored ones
    ok(base, "search", "x", "--rerank", "-k", "6")


# -- a really full disk (a small tmpfs; needs root) -----------------------------


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = _mount("-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt))
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill the disk but for ``leave`` bytes; the filler's path, to free it again."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (1 << 16, 4096, 1):  # to the last byte of the last page
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def refused(base: list[str], disk: Path, leave: int, *args: str, capfd: pytest.CaptureFixture[str]) -> str:
    """Run a command on the disk filled but for ``leave`` bytes: its one error line names the home,
    and nothing else (FAISS's C++ writer, say) wrote to the process's stderr behind Python's back."""
    capfd.readouterr()
    filler = fill(disk, leave)
    try:
        line = one_error_line(invoke(base, *args))
    finally:
        filler.unlink()
    assert line.startswith("error: cannot ") and str(disk) in line, line
    assert capfd.readouterr().err == ""
    return line


#: Room left on the disk: none at all (SQLite cannot even open the catalog's -shm), a few
#: pages (the catalog opens, a write fails), more (later writes fail: tokens, FAISS files).
ROOM = (0, 96 << 10, 160 << 10)


def test_full_disk_index_repair_add_texts(
    small_disk: Path, rerank_model: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    photos, home = tmp_path / "photos", small_disk / "home"
    base = ["--home", str(home), "--model", str(rerank_model), "--workers", "0", "--batch-size", "8"]
    for i in range(4):
        picture(photos / f"{i}.png", i)
    ok(base, "index", "--quiet", str(photos))
    seen = []
    for round, leave in enumerate(ROOM):
        for i in range(100 * round + 4, 100 * round + 16):
            picture(photos / f"{i}.png", i)
        seen.append(refused(base, small_disk, leave, "index", "--quiet", str(photos), capfd=capfd))
        before = image_count(home)
        result = ok(base, "index", "--quiet", "--json", str(photos))
        assert json.loads(result.stdout.splitlines()[-1])["skipped"] == 0
        assert image_count(home) == len(list(photos.iterdir())) >= before
        agrees(home, rerank_model)

    for leave in (0, 36 << 10):  # with 36 KiB the catalog opens (its -shm takes 32), the index file fails
        (home / "images.faiss").unlink()
        seen.append(refused(base, small_disk, leave, "check", "--repair", capfd=capfd))
        ok(base, "check", "--repair")
        agrees(home, rerank_model)

    corpus = tmp_path / "texts.txt"
    for round, leave in enumerate(ROOM):
        corpus.write_text("".join(f"a longer text, number {i} of round {round}, to take some room\n" for i in range(1200)))
        seen.append(refused(base, small_disk, leave, "add-texts", "--quiet", str(corpus), capfd=capfd))
        ok(base, "add-texts", "--quiet", str(corpus))
        agrees(home, rerank_model)
    assert len(seen) == 8  # the lines themselves: docs/reliability-disk.md
    assert len(ok(base, "search", "x", "-k", "1000", "--json").stdout.splitlines()) == image_count(home)


# -- read-only homes --------------------------------------------------------------


@pytest.fixture
def read_only_view(tmp_path: Path) -> Iterator:
    """``view(folder)``: a read-only bind mount of ``folder`` (needs root); unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    mounted: list[Path] = []

    def view(folder: Path) -> Path:
        target = tmp_path / f"ro-{len(mounted)}"
        target.mkdir()
        for args in (("--bind", str(folder), str(target)), ("-o", "remount,ro,bind", str(target))):
            done = _mount(*args)
            if done.returncode:
                if mounted or args[0] == "-o":
                    subprocess.run(["umount", str(target)], check=False)
                pytest.skip(f"cannot make a read-only bind mount here: {done.stderr.strip()}")
        mounted.append(target)
        return target

    try:
        yield view
    finally:
        for target in mounted:
            subprocess.run(["umount", "-l", str(target)], check=False)


def test_read_only_home_searches(tmp_path: Path, tiny_model: Path, photo_dir: Path, read_only_view) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    ok(["--home", str(home), "--model", str(tiny_model)], "index", "--quiet", str(photo_dir))
    corpus = tmp_path / "texts.txt"
    corpus.write_text("a red square\na blue square\n")
    ok(["--home", str(home)], "add-texts", "--quiet", str(corpus))
    (home / "write.lock").unlink()  # readers must not need it
    (home / "index.lock").unlink(missing_ok=True)
    assert not Path(f"{home}/catalog.sqlite3-wal").exists()  # closed cleanly: immutable=1 is what opens it

    ro = read_only_view(home)
    base = ["--home", str(ro)]
    assert len(ok(base, "search", "red", "--json").stdout.splitlines()) == 6
    assert len(ok(base, "search", "red", "--texts", "--json").stdout.splitlines()) == 2
    status = json.loads(ok(base, "status", "--json").stdout)
    assert (status["images"], status["texts"], status["model"]) == (6, 2, f"local-dir:{tiny_model}")
    assert ok(base, "check").stdout.strip().endswith("ok")
    for args in (("index", "--quiet", str(photo_dir)), ("add-texts", "--quiet", str(corpus)), ("check", "--repair")):
        line = one_error_line(invoke(base, *args))
        assert line == (
            f"error: {ro} is read-only; search, status and check work there, "
            "but index, add-texts and check --repair need a home you can write to"
        ), line
    assert not (home / "write.lock").exists()

    # an index file that is gone is rebuilt, and kept in memory only
    (home / "images.faiss").unlink()
    assert len(ok(base, "search", "blue", "--json").stdout.splitlines()) == 6
    assert not (home / "images.faiss").exists()
    assert "images.faiss is missing" in invoke(base, "check").stdout


def test_read_only_home_with_a_writer_open(tmp_path: Path, tiny_model: Path, photo_dir: Path, read_only_view) -> None:  # type: ignore[no-untyped-def]
    """Commits still in the -wal (a writer has the catalog open) are read too: ``mode=ro``, not ``immutable``."""
    home = tmp_path / "home"
    ok(["--home", str(home), "--model", str(tiny_model)], "index", "--quiet", str(photo_dir))
    writer = sqlite3.connect(home / "catalog.sqlite3", isolation_level=None)
    try:
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("INSERT INTO meta (key, value) VALUES ('probe', 'in the wal')")
        assert Path(f"{home}/catalog.sqlite3-wal").stat().st_size > 0
        ro = read_only_view(home)
        with Catalog.open(ro / "catalog.sqlite3", create=False) as catalog:
            assert catalog.readonly and catalog.get_meta("probe") == "in the wal"
        assert len(ok(["--home", str(ro)], "search", "red", "--json").stdout.splitlines()) == 6
    finally:
        writer.close()


_AS_USER = textwrap.dedent(
    """
    import json, sys
    from typer.testing import CliRunner
    from mmsearch.cli import app
    out = []
    for args in json.loads(sys.argv[1]):
        r = CliRunner().invoke(app, args)
        out.append({"code": r.exit_code, "stdout": r.stdout, "stderr": r.stderr})
    print(json.dumps(out))
    """
)


def test_home_not_writable_by_the_user(tmp_path: Path, tiny_model: Path, photo_dir: Path) -> None:
    """A folder only others may write (``chmod a-w``). Tests run as root, whom permissions do not
    stop, so the commands run in a child without root's permission override (CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop the permission override")
    home = tmp_path / "home"
    ok(["--home", str(home), "--model", str(tiny_model)], "index", "--quiet", str(photo_dir))
    for path in [home, *home.iterdir()]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    commands = [
        ["--home", str(home), "search", "red", "--json"],
        ["--home", str(home), "status", "--json"],
        ["--home", str(home), "check"],
        ["--home", str(home), "index", "--quiet", str(photo_dir)],
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")) if p)}
    try:
        done = subprocess.run(
            ["setpriv", "--bounding-set=-dac_override,-dac_read_search", sys.executable, "-c", _AS_USER, json.dumps(commands)],
            capture_output=True, text=True, env=env, timeout=300,
        )
    finally:
        for path in [home, *home.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    if done.returncode and "setpriv" in done.stderr:
        pytest.skip(f"cannot drop capabilities here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    search, status, check, index = json.loads(done.stdout.splitlines()[-1])
    assert search["code"] == 0 and len(search["stdout"].splitlines()) == 6, search
    assert status["code"] == 0 and json.loads(status["stdout"])["images"] == 6, status
    assert check["code"] == 0 and check["stdout"].strip().endswith("ok"), check
    assert index["code"] == 1 and index["stderr"].strip() == (
        f"error: {home} is read-only; search, status and check work there, "
        "but index, add-texts and check --repair need a home you can write to"
    ), index


def test_read_only_home_with_a_moved_model(tmp_path: Path, tiny_model: Path, photo_dir: Path, read_only_view) -> None:  # type: ignore[no-untyped-def]
    """The move is recognised but cannot be recorded: the home keeps naming the old path, and works."""
    model = Path(shutil.copytree(tiny_model, tmp_path / "model"))
    home = tmp_path / "home"
    ok(["--home", str(home), "--model", str(model)], "index", "--quiet", str(photo_dir))
    moved = tmp_path / "moved"
    shutil.move(model, moved)
    ro = read_only_view(home)
    base = ["--home", str(ro), "--model", str(moved)]
    assert len(ok(base, "search", "red", "--json").stdout.splitlines()) == 6
    assert json.loads(ok(base, "status", "--json").stdout)["model"] == f"local-dir:{model}"
    assert ok(base, "check").stdout.strip().endswith("ok")
    with Catalog.open(ro / "catalog.sqlite3", create=False) as catalog:
        assert catalog.get_meta("model") == f"local-dir:{model}"


def test_read_only_home_with_a_wal_but_no_shm(tmp_path: Path, tiny_model: Path, photo_dir: Path, read_only_view) -> None:  # type: ignore[no-untyped-def]
    """A writer killed, then the disk made read-only without its -shm: one line that says what to do."""
    home = tmp_path / "home"
    ok(["--home", str(home), "--model", str(tiny_model)], "index", "--quiet", str(photo_dir))
    writer = sqlite3.connect(home / "catalog.sqlite3", isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("INSERT INTO meta (key, value) VALUES ('probe', 'in the wal')")
    shutil.copy(f"{home}/catalog.sqlite3-wal", tmp_path / "wal")
    writer.close()
    shutil.copy(tmp_path / "wal", f"{home}/catalog.sqlite3-wal")
    ro = read_only_view(home)
    line = one_error_line(invoke(["--home", str(ro)], "search", "red"))
    assert "catalog.sqlite3-wal holds writes not yet in the catalog" in line, line
