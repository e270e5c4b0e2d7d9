"""Decode stage: read image files into upright RGB pictures and model-ready tensors.

Reading hashes the bytes once (the content hash lets renamed or copied files
reuse their vectors). JPEGs are decoded at reduced scale when the model needs
far fewer pixels than the file holds. Decoding runs in worker threads (Pillow
releases the GIL while it decodes and resizes); results come back in order.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, BinaryIO

from PIL import Image, ImageOps

from mmsearch.discover import FileEntry
from mmsearch.files import DEFAULT_MAX_FILE_SIZE, FileRefused, read_regular

_heif_checked = False


def enable_heif() -> bool:
    """Register the HEIC/HEIF opener when the optional ``pillow-heif`` is installed."""
    global _heif_checked
    if not _heif_checked:
        _heif_checked = True
        try:
            from pillow_heif import register_heif_opener
        except ImportError:
            return False
        register_heif_opener()
    return True


def content_hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def to_rgb(img: Image.Image) -> Image.Image:
    """An RGB picture; transparency is laid over white, 16-bit depth scaled down."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's own conversion clips 16-bit values at 255 (a white picture).
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).astype("uint8"), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


#: PNG chunks that only carry metadata Pillow caps (text, colour profile): dropped
#: when a file is refused for them, so a picture is not lost to its metadata.
_PNG_METADATA_CHUNKS = frozenset({b"tEXt", b"zTXt", b"iTXt", b"iCCP"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def strip_png_metadata(data: bytes) -> bytes | None:
    """``data`` (a PNG) without its text and ICC chunks; ``None`` if it has none or is no PNG.

    Pillow refuses a PNG whose text chunks decompress past
    ``PngImagePlugin.MAX_TEXT_CHUNK`` (or sum past ``MAX_TEXT_MEMORY``), pixels
    and all. Those limits are module state shared by the whole process, so
    rather than raising them, the chunks are removed from this one file's bytes.
    Each PNG chunk carries its own CRC, so the rest stays valid.
    """
    if not data.startswith(_PNG_SIGNATURE):
        return None
    kept = [_PNG_SIGNATURE]
    pos, dropped = len(_PNG_SIGNATURE), False
    while pos + 8 <= len(data):
        length, tag = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if tag in _PNG_METADATA_CHUNKS:
            dropped = True
        else:
            kept.append(data[pos:end])
        pos = end
        if tag == b"IEND":
            break
    kept.append(data[pos:])  # a truncated tail stays as it was, for the decoder to judge
    return b"".join(kept) if dropped else None


def _is_png_metadata_limit(exc: Exception) -> bool:
    return isinstance(exc, ValueError) and ("MAX_TEXT_CHUNK" in str(exc) or "MAX_TEXT_MEMORY" in str(exc))


def load_image(
    source: str | bytes | BinaryIO, min_side: int | None = None, *, max_bytes: int = DEFAULT_MAX_FILE_SIZE
) -> Image.Image:
    """Open, orient (EXIF) and convert an image to RGB.

    With ``min_side``, a JPEG is decoded at the smallest power-of-two scale
    that keeps both sides at least that long (``Image.draft``), many times
    faster than a full decode for a model that sees 224 pixels. A path is read
    through :func:`mmsearch.files.read_regular` (at most ``max_bytes``; a FIFO
    or device raises :class:`~mmsearch.files.FileRefused`, never blocks). A
    PNG refused for oversized text chunks is decoded without them.
    """
    if isinstance(source, (str, os.PathLike)):
        source = read_regular(os.fspath(source), max_bytes)[0]
    if not isinstance(source, bytes):
        return _load(source, min_side)
    try:
        return _load(io.BytesIO(source), min_side)
    except ValueError as exc:
        stripped = strip_png_metadata(source) if _is_png_metadata_limit(exc) else None
        if stripped is None:
            raise
    return _load(io.BytesIO(stripped), min_side)


def _load(source: BinaryIO, min_side: int | None) -> Image.Image:
    # Pillow warns about odd EXIF data and palette transparency; errors still raise.
    # Front ends silence those warnings once (mmsearch.runtime.quiet_library_warnings):
    # catch_warnings here would swap the process's filters from every decode thread.
    img = Image.open(source)
    if min_side and img.format == "JPEG":
        img.draft("RGB", (min_side, min_side))
    img.seek(0)  # the first frame of an animation
    img.load()
    img = ImageOps.exif_transpose(img) or img
    return to_rgb(img)


@dataclass(slots=True)
class Decoded:
    """A file read and, unless its vector can be reused, decoded to a tensor."""

    entry: FileEntry
    content_hash: str
    width: int = 0
    height: int = 0
    pixels: Any = None  # torch.Tensor (3, H, W) when the file needs encoding


@dataclass(slots=True)
class Skipped:
    path: str
    reason: str
    #: an error reading the file (permissions, I/O) that may pass without the file changing
    transient: bool = False


def decode_file(
    entry: FileEntry,
    preprocess: Callable[[Image.Image], Any],
    min_side: int,
    reusable: Callable[[str], bool] = lambda _h: False,
    max_bytes: int = DEFAULT_MAX_FILE_SIZE,
) -> Decoded | Skipped:
    """Read (at most ``max_bytes``), hash and decode one file; never raises for a bad file."""
    try:
        data, st = read_regular(entry.path, max_bytes)
    except FileRefused as exc:
        return Skipped(entry.path, exc.reason, transient=exc.transient)
    if not data:
        return Skipped(entry.path, "empty file")
    # size and mtime as read, in case the file changed since discovery
    entry = FileEntry(entry.path, st.st_size, st.st_mtime_ns)
    digest = content_hash(data)
    if reusable(digest):
        return Decoded(entry, digest)
    try:
        img = load_image(data, min_side)
    except Exception as exc:  # Pillow raises many types for bad data
        return Skipped(entry.path, decode_failure(exc))
    try:
        pixels = preprocess(img)
    except Exception as exc:  # a picture the model's preprocessing cannot take: say what it said
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Skipped(entry.path, f"cannot prepare it for the model: {reason[:160]}")
    return Decoded(entry, digest, img.width, img.height, pixels)


def decode_failure(exc: BaseException) -> str:
    """Why Pillow could not decode a file, in a user's words rather than Pillow's."""
    if isinstance(exc, Image.DecompressionBombError):
        return "too many pixels to decode safely (a decompression bomb?)"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (or a format this tool cannot read)"
    if isinstance(exc, MemoryError):
        return "too large to decode in the memory available"
    return "truncated or corrupt image"


def decode_many(
    entries: Iterable[FileEntry],
    decode: Callable[[FileEntry], Decoded | Skipped],
    workers: int,
    window: int = 64,
) -> Iterator[Decoded | Skipped]:
    """Apply ``decode`` to ``entries`` in ``workers`` threads, yielding in input order.

    At most ``window`` results are held at once, so memory stays bounded.
    """
    if workers <= 0:
        for entry in entries:
            yield decode(entry)
        return
    pending: deque[Future[Decoded | Skipped]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmsearch-decode") as pool:
        for entry in entries:
            pending.append(pool.submit(decode, entry))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
