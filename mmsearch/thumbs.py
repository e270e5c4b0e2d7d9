"""Thumbnails: small upright previews of catalogued images, cached in the home by content hash.

A thumbnail is made on first request from the image file (EXIF orientation
applied, at most :data:`THUMB_SIZE` pixels on its long side), as WebP, or JPEG
where Pillow lacks WebP, and written atomically under
``HOME/thumbs/ab/abcdef….webp``. Renamed or copied files share one. A
thumbnail that cannot be written (disk full, read-only home) is still
returned, from memory.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, features

from mmsearch.decode import content_hash, decode_failure, enable_heif, load_image
from mmsearch.errors import InputFileError
from mmsearch.files import DEFAULT_MAX_FILE_SIZE, FileRefused, read_regular

#: The long side of a thumbnail, in pixels.
THUMB_SIZE = 256

_WEBP = features.check("webp")
FORMAT, SUFFIX, MEDIA_TYPE = ("WEBP", ".webp", "image/webp") if _WEBP else ("JPEG", ".jpg", "image/jpeg")


@dataclass(frozen=True)
class Thumbnail:
    data: bytes
    media_type: str
    content_hash: str


def thumb_path(home_dir: Path, digest: str) -> Path:
    """Where the thumbnail of content ``digest`` is cached."""
    return home_dir / "thumbs" / digest[:2] / f"{digest}{SUFFIX}"


def thumbnail(home_dir: Path, source: str, digest: str, max_bytes: int = DEFAULT_MAX_FILE_SIZE) -> Thumbnail:
    """The thumbnail of the image file ``source``, whose content hash the catalog records as ``digest``.

    Read from the cache when there; else made from the file and cached under
    the hash of the bytes just read (which is ``digest`` unless the file has
    changed since it was indexed).
    """
    cached = thumb_path(home_dir, digest)
    try:
        return Thumbnail(cached.read_bytes(), MEDIA_TYPE, digest)
    except OSError:
        pass
    try:
        raw = read_regular(source, max_bytes)[0]  # regular files only, never a FIFO that blocks
    except FileRefused as exc:
        raise InputFileError(f"{source}: {exc.reason}") from None
    actual = content_hash(raw)
    data = make_thumbnail(raw, name=source)
    store_thumbnail(thumb_path(home_dir, actual), data)
    return Thumbnail(data, MEDIA_TYPE, actual)


def make_thumbnail(raw: bytes, name: str = "the image") -> bytes:
    """Encode the thumbnail of an image file's bytes (decoded as indexing decodes files)."""
    enable_heif()
    try:
        img = load_image(raw, THUMB_SIZE)
    except Exception as exc:
        raise InputFileError(f"{name}: {decode_failure(exc)}") from None
    img.thumbnail((THUMB_SIZE, THUMB_SIZE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, FORMAT, quality=80)
    return out.getvalue()


def store_thumbnail(path: Path, data: bytes) -> bool:
    """Write a thumbnail atomically (temp file, rename); ``False`` when it cannot be written."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        tmp = None
        return True
    except OSError:
        return False
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
