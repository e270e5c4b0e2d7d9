"""Discover stage: walk folders and yield the image files in them, with size and mtime."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mmsearch.errors import UsageError
from mmsearch.files import describe_os_error, not_a_file

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff", ".heic", ".heif"}
)

#: Folder names never descended into (hidden folders are skipped too).
JUNK_DIRS = frozenset(
    {
        "node_modules", "__pycache__", "@eaDir", "#recycle", "@Recycle", "#snapshot",
        "$RECYCLE.BIN", "System Volume Information", "lost+found", "venv", "site-packages",
    }
)


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str  # absolute, as the user reaches it (symlinks not resolved)
    size: int
    mtime_ns: int


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def check_roots(roots: Iterable[str | Path]) -> list[str]:
    """Absolute paths of the roots; a missing root is a usage error naming it."""
    out = []
    for root in roots:
        path = os.path.abspath(os.path.expanduser(str(root)))
        if not os.path.exists(path):
            raise UsageError(f"no such file or folder: {root}")
        out.append(path)
    return out


def walk(
    roots: Iterable[str],
    on_error: Callable[[str, str], None] | None = None,
    *,
    on_skip: Callable[[str, str], None] | None = None,
    on_ignored: Callable[[str], None] | None = None,
) -> Iterator[FileEntry]:
    """Yield every image file under ``roots`` (recursively), each once.

    Hidden files and folders and :data:`JUNK_DIRS` are skipped; symlinked
    folders are followed once (loops are cut by device/inode). Only regular
    files are yielded (a symlink to one is fine): a FIFO, socket or device
    with an image's name goes to ``on_skip`` with the reason, never opened.
    ``on_error`` gets what could not be listed or looked at; ``on_ignored``
    every visible file whose name is not an image's (``.svg``, ``.txt``...).
    """
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()

    def report(path: str, reason: str) -> None:
        if on_error is not None:
            on_error(path, reason)

    def refuse(path: str, reason: str) -> None:
        if on_skip is not None:
            on_skip(path, reason)

    for root in roots:
        try:
            st = os.stat(root)
        except OSError as exc:
            report(root, describe_os_error(exc))
            continue
        if not stat.S_ISDIR(st.st_mode):
            if root not in seen_files:
                seen_files.add(root)
                kind = not_a_file(st.st_mode)
                if kind is not None:
                    refuse(root, kind)
                else:
                    yield FileEntry(root, st.st_size, st.st_mtime_ns)
            continue
        stack = [root]
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder)
                key = (st.st_dev, st.st_ino)
                if key in seen_dirs:
                    continue
                seen_dirs.add(key)
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as exc:
                report(folder, describe_os_error(exc))
                continue
            subdirs = []
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                try:
                    if entry.is_dir():
                        if name not in JUNK_DIRS:
                            subdirs.append(entry.path)
                        continue
                    if not is_image_name(name):
                        if on_ignored is not None:
                            on_ignored(entry.path)
                        continue
                    if entry.path in seen_files:
                        continue
                    st = entry.stat()  # follows a symlink; a stat never blocks, an open might
                except OSError as exc:
                    report(entry.path, describe_os_error(exc))
                    continue
                seen_files.add(entry.path)
                kind = not_a_file(st.st_mode)
                if kind is not None:
                    refuse(entry.path, kind)
                    continue
                yield FileEntry(entry.path, st.st_size, st.st_mtime_ns)
            stack.extend(reversed(subdirs))
