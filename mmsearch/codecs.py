"""How values are stored in the catalog: vectors as little-endian blobs, file paths as text."""

from __future__ import annotations

import operator
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mmsearch.errors import CatalogError


#: How a catalog may store its vectors (``meta.vector_dtype``), as little-endian numpy dtypes.
VECTOR_DTYPES = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


#: Rows a write converts to the catalog's dtype at a time (see :meth:`Catalog._blobs`).
CAST_BLOCK = 1024


def row_views(block: np.ndarray) -> Iterator[memoryview]:
    """Each row of a C-contiguous 2-d array as a view of its bytes."""
    data, width = memoryview(block).cast("B"), block.itemsize * block.shape[1]
    for start in range(0, len(data), width):
        yield data[start:start + width]


def from_blobs(blobs: Sequence[bytes], dim: int, dtype: np.dtype = VECTOR_DTYPES["float32"]) -> np.ndarray:
    """``(len(blobs), dim)`` float32 vectors from blobs of ``dtype`` values."""
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    size = dim * np.dtype(dtype).itemsize
    bad = sum(len(blob) != size for blob in blobs)
    if bad:
        raise CatalogError(
            f"{bad} stored vectors are not {dim} {np.dtype(dtype).name} values: the catalog is damaged "
            "(`mmsearch check` reports it)"
        )
    return np.frombuffer(b"".join(blobs), dtype=dtype).reshape(len(blobs), dim).astype(np.float32)


# -- file paths in the catalog ------------------------------------------------
# A POSIX file name is bytes; Python shows the bytes that are not UTF-8 as lone
# surrogates (U+DC80..U+DCFF), which SQLite text cannot hold. The catalog stores
# each such byte as NUL + two hex digits: NUL never occurs in a path, so the
# mapping is reversible, and every UTF-8 path is stored unchanged.
_ESCAPED_BYTE = re.compile("\x00([0-9a-f]{2})")


def path_to_db(path: str) -> str:
    """The catalog's text for a file path (see above)."""
    if path.isascii():  # the common case, and a constant-time check
        return path
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return "".join(f"\x00{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else c for c in path)


def path_from_db(text: str) -> str:
    """The file path (as ``os`` functions take it) of the catalog's text."""
    if "\x00" not in text:
        return text
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)


_PATH = operator.itemgetter("path")


def with_db_paths(rows: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
    """The rows, with each ``path`` as the catalog's text (a copy of a row only where that differs)."""
    if all(map(str.isascii, map(_PATH, rows))):  # the common case, ~30 ns a row
        return rows
    return [row if path_to_db(row["path"]) is row["path"] else {**row, "path": path_to_db(row["path"])} for row in rows]
