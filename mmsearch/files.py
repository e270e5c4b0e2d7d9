"""Safe reading of files named by a walk or a user: regular files only, never a blocking open, a cap on bytes.

A folder can hold things whose names look like pictures but are not files: a
FIFO (reading it waits forever for a writer), a socket, a symlink to a device
(``/dev/zero`` never ends). :func:`not_a_file` names them from a ``stat``
without opening them; :func:`read_regular` opens without blocking, checks
again on the open descriptor (the path may have been swapped since the
``stat``), and reads at most one byte past the size limit, so neither a device
nor a file that grows while it is read can fill memory. Failures are worded
for users (:func:`describe_os_error`), not as ``errno`` names.
"""

from __future__ import annotations

import errno
import os
import stat

#: Bytes read from one image at most, unless ``--max-file-size`` /
#: ``MMSEARCH_MAX_FILE_SIZE`` says otherwise (the largest camera RAW-sized
#: JPEGs and panoramas stay well under it).
DEFAULT_MAX_FILE_SIZE = 200_000_000

#: Opened without waiting for a FIFO's writer or a device; never the controlling terminal.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
#: After the first read (the size ``fstat`` gave), reads continue in pieces
#: doubling from the first to the second size (a short read, or a file that grew).
_NEXT_READ = 1 << 16
_MAX_READ = 1 << 22


class FileRefused(Exception):
    """A file that was not read (or not all of it), with the reason in a user's words.

    ``transient``: the reason may pass without the file changing (permissions,
    an I/O error, a size limit that can be raised), so it is not remembered as
    a bad file.
    """

    def __init__(self, reason: str, *, transient: bool = True):
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


def format_size(n: int) -> str:
    """``200000000`` -> ``"200 MB"``: sizes in decimal units, as the limit is given."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) or value >= 100 else f"{value:.1f} {unit}"
    return f"{n} bytes"


def not_a_file(mode: int) -> str | None:
    """Why a ``stat`` mode is not a regular file, in words; ``None`` for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe), not a file"
    if stat.S_ISSOCK(mode):
        return "a socket, not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a file"
    return "not a regular file"


def too_large(size: int, limit: int) -> str:
    return f"larger than the {format_size(limit)} limit (--max-file-size)"


def describe_os_error(exc: OSError) -> str:
    """An ``OSError`` in a user's words, without the path (the caller names the file)."""
    code = exc.errno
    if code in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if code == errno.ENOENT:
        return "not found (deleted, or a link to nothing)"
    if code == errno.ELOOP:
        return "a symbolic link that loops (Too many levels of symbolic links)"
    if code == errno.EIO:
        return "read error (I/O error: a failing disk or a dropped network share?)"
    if code == errno.ENAMETOOLONG:
        return "path too long for the system (File name too long)"
    if code in (errno.EAGAIN, errno.EWOULDBLOCK):
        return "not readable now without waiting (a pipe or a device?)"
    return exc.strerror or str(exc) or type(exc).__name__


def open_nonblocking(path: str) -> int:
    """A read-only descriptor of ``path``; never waits (a FIFO with no writer opens at once)."""
    return os.open(path, _OPEN_FLAGS)


def read_regular(path: str, limit: int) -> tuple[bytes, os.stat_result]:
    """The bytes of the regular file at ``path`` and its ``fstat``; raises :class:`FileRefused`.

    Symlinks are followed (a link to a picture is a picture); what is checked
    is the file the descriptor reached, so a FIFO or device swapped in after
    the caller's ``stat`` is still refused before any read. A file over
    ``limit`` bytes, by its size or by what a read returns, is refused.
    """
    try:
        fd = open_nonblocking(path)
    except OSError as exc:
        raise FileRefused(describe_os_error(exc)) from None
    try:
        try:
            st = os.fstat(fd)
            kind = not_a_file(st.st_mode)
            if kind is not None:
                raise FileRefused(kind)
            if st.st_size > limit:
                raise FileRefused(too_large(st.st_size, limit))
            if hasattr(os, "set_blocking"):
                os.set_blocking(fd, True)  # a regular file: reads wait for the disk, as they should
            pieces: list[bytes] = []
            got = 0
            want = st.st_size + 1  # the whole file in one read, as a rule; one byte more shows growth
            then = _NEXT_READ
            while got <= limit:
                piece = os.read(fd, min(want, limit + 1 - got))
                if not piece:
                    break
                pieces.append(piece)
                got += len(piece)
                want, then = then, min(2 * then, _MAX_READ)
        except OSError as exc:
            raise FileRefused(describe_os_error(exc)) from None
        except MemoryError:
            raise FileRefused("not enough memory to read it") from None
    finally:
        os.close(fd)
    if got > limit:  # it grew past the limit while it was read
        raise FileRefused(too_large(got, limit))
    return b"".join(pieces), st
