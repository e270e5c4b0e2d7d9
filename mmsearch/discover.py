"""Discover stage: walk folders and yield the image files in them, with size and mtime."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mmsearch.errors import UsageError

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


def walk(roots: Iterable[str], on_error: Callable[[str, str], None] | None = None) -> Iterator[FileEntry]:
    """Yield every image file under ``roots`` (recursively), each once.

    Hidden files and folders and :data:`JUNK_DIRS` are skipped; symlinked
    folders are followed once (loops are cut by device/inode).
    """
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()

    def report(path: str, reason: str) -> None:
        if on_error is not None:
            on_error(path, reason)

    for root in roots:
        if os.path.isfile(root):
            if root not in seen_files:
                seen_files.add(root)
                try:
                    st = os.stat(root)
                except OSError as exc:
                    report(root, exc.strerror or str(exc))
                    continue
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
                report(folder, exc.strerror or str(exc))
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
                    if not is_image_name(name) or entry.path in seen_files:
                        continue
                    st = entry.stat()
                except OSError as exc:
                    report(entry.path, exc.strerror or str(exc))
                    continue
                seen_files.add(entry.path)
                yield FileEntry(entry.path, st.st_size, st.st_mtime_ns)
            stack.extend(reversed(subdirs))
