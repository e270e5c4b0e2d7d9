"""Queries and hits: what a search is asked and what it answers, with no model behind them.

A text query may be a sum of weighted terms, ``"cat + 2:snow - dog"``; a term
that names an existing image file stands for that image. Terms are separated
by `` + `` or `` - `` with spaces around, so ``t-shirt`` is one term. An
example image may be a path, the file's bytes or a picture. This leaf module
is shared by :mod:`mmsearch.search`, the re-ranking half of search, the
library and its front ends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from mmsearch.decode import decode_failure, enable_heif, load_image
from mmsearch.discover import is_image_name
from mmsearch.errors import InputFileError, UsageError
from mmsearch.files import FileRefused, describe_os_error, not_a_file
from mmsearch.schema import Kind

if TYPE_CHECKING:
    from PIL import Image

#: An example image given to a search: a file path, the file's bytes, or a picture.
ImageInput = Union[Path, str, bytes, "Image.Image"]

_OPERATOR = re.compile(r"\s+([+-])\s+")
_WEIGHT = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*:\s*(\S.*)$")


@dataclass(frozen=True)
class Term:
    weight: float
    text: str
    image: Path | None = None


@dataclass
class Hit:
    rank: int
    score: float
    id: int | str
    kind: Kind
    path: str | None = None
    text: str | None = None
    meta: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rank": self.rank, "score": round(float(self.score), 6), "id": self.id}
        if self.kind == "image":
            out["path"] = self.path
        else:
            out["text"] = self.text
            if self.meta:
                out["meta"] = self.meta
        out.update(self.extra)
        return out


def parse_query(query: str, *, files: bool = True) -> list[Term]:
    """Split ``"a + 2:b - c"`` into weighted terms; image paths become image terms.

    ``files=False`` never looks at the file system: every term is text (a
    server must not open paths that its clients name).
    """
    parts = _OPERATOR.split(" " + query.strip() + " ")
    terms: list[Term] = []
    sign = 1.0
    for i, part in enumerate(parts):
        if i % 2 == 1:
            sign = 1.0 if part == "+" else -1.0
            continue
        text = part.strip()
        if not text:
            continue
        weight = 1.0
        match = _WEIGHT.match(text)
        if match:
            weight, text = float(match.group(1)), match.group(2).strip()
        terms.append(Term(sign * weight, text, _image_term(text) if files else None))
    if not terms:
        raise UsageError("empty query: give some text or an example image")
    return terms


def _image_term(text: str) -> Path | None:
    """The image a query term names: an existing path with an image's extension, else ``None`` (text)."""
    if not is_image_name(text):
        return None
    candidate = Path(text).expanduser()
    try:
        mode = candidate.stat().st_mode
    except (OSError, ValueError):  # no such file (or no possible one): the term is text
        return None
    kind = not_a_file(mode)
    if kind is not None:
        raise InputFileError(f"{candidate}: {kind} (a query term that names a path must name an image file)")
    return candidate


def check_query_image(path: Path) -> None:
    """Raise :class:`InputFileError` unless ``path`` is a regular file (a directory, FIFO... is not)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputFileError(f"no such image: {path}") from None
    except OSError as exc:
        raise InputFileError(f"{path}: {describe_os_error(exc)}") from None
    except ValueError:  # a NUL in the name
        raise InputFileError(f"no such image: {path!r}") from None
    kind = not_a_file(mode)
    if kind is not None:
        raise InputFileError(f"{path}: {kind}")


def open_query_image(image: ImageInput, min_side: int, max_bytes: int | None = None) -> "Image.Image":
    """An example image as an upright RGB picture, whatever form it was given in.

    Paths and bytes are read and decoded as indexing reads files (regular
    files only, at most ``max_bytes``, the same decompression-bomb guard);
    anything unusable is an :class:`InputFileError` that says why.
    """
    from PIL import Image as PILImage

    if isinstance(image, PILImage.Image):
        from mmsearch.decode import to_rgb

        return to_rgb(image)
    enable_heif()
    limit = {} if max_bytes is None else {"max_bytes": max_bytes}
    if isinstance(image, (bytes, bytearray, memoryview)):
        source: Path | bytes = bytes(image)
        name = "the image"
        if not source:
            raise InputFileError("the image is empty")
    else:
        source = Path(image)
        check_query_image(source)
        name = str(source)
    try:
        return load_image(source, min_side, **limit)
    except FileRefused as exc:
        raise InputFileError(f"{name}: {exc.reason}") from None
    except Exception as exc:
        raise InputFileError(f"{name}: {decode_failure(exc)}") from None
