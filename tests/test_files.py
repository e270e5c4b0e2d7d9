"""mmsearch.files: only regular files are read, no open blocks, and no read passes the size limit."""

from __future__ import annotations

import errno
import os
import socket
import threading
from pathlib import Path

import pytest

import mmsearch.files as files
from mmsearch.decode import Skipped, decode_file
from mmsearch.discover import FileEntry
from mmsearch.files import FileRefused, describe_os_error, format_size, not_a_file, read_regular


def within(seconds: float, fn, *, unblock: Path | None = None):  # type: ignore[no-untyped-def]
    """``fn()``'s result or exception, failing (not hanging) if it takes longer than ``seconds``.

    ``unblock``: a FIFO to open for writing if ``fn`` is stuck, so its thread can end.
    """
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if unblock is not None:
            os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))  # EOF for the stuck reader
        pytest.fail(f"still running after {seconds} s: a read blocked")
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")


def test_regular_file_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 5000)
    data, st = read_regular(str(path), 5000)
    assert data == b"x" * 5000 and st.st_size == 5000


def test_file_over_the_limit_is_refused_by_its_size(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 5000)
    with pytest.raises(FileRefused, match="larger than the 4 kB limit") as info:
        read_regular(str(path), 4000)
    assert info.value.transient  # a raised limit reads it: not remembered as bad


def test_a_file_that_grows_past_the_limit_is_not_read_further(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "growing.bin"
    path.write_bytes(b"x" * 50_000)
    real_fstat, real_read = os.fstat, os.read
    asked: list[int] = []

    def small_fstat(fd: int) -> os.stat_result:  # as it was before it grew
        st = list(real_fstat(fd))
        st[6] = 10  # st_size
        return os.stat_result(st)

    def counting_read(fd: int, n: int) -> bytes:
        asked.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(files.os, "fstat", small_fstat)
    monkeypatch.setattr(files.os, "read", counting_read)
    with pytest.raises(FileRefused, match="larger than the 1 kB limit"):
        read_regular(str(path), 1000)
    assert sum(asked) <= 1001


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(FileRefused, match=r"a FIFO \(named pipe\), not a file"):
        within(10, lambda: read_regular(str(fifo), 1000), unblock=fifo)


def test_device_is_refused_before_any_read() -> None:
    with pytest.raises(FileRefused, match="a device, not a file"):
        within(10, lambda: read_regular("/dev/zero", 1 << 40))


def test_file_swapped_for_a_fifo_after_its_stat_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "swapped.jpg"
    path.write_bytes(b"\xff\xd8 a JPEG, once")
    st = path.stat()
    entry = FileEntry(str(path), st.st_size, st.st_mtime_ns)  # what the walk saw
    path.unlink()
    os.mkfifo(path)
    result = within(10, lambda: decode_file(entry, lambda im: im, 16), unblock=path)
    assert isinstance(result, Skipped) and result.reason == "a FIFO (named pipe), not a file"


def test_kinds_and_errors_in_words(tmp_path: Path) -> None:
    assert not_a_file(os.stat(tmp_path).st_mode) == "a folder, not a file"
    assert not_a_file(os.stat("/dev/null").st_mode) == "a device, not a file"
    sock_path = tmp_path / "s.jpg"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        assert not_a_file(os.stat(sock_path).st_mode) == "a socket, not a file"
    assert describe_os_error(PermissionError(errno.EACCES, "Permission denied")) == "permission denied"
    assert "deleted" in describe_os_error(FileNotFoundError(errno.ENOENT, "No such file or directory"))
    assert format_size(200_000_000) == "200 MB" and format_size(1_500_000_000) == "1.5 GB"
