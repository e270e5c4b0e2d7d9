"""Search stage: turn a query into a vector and find the nearest images or texts.

A text query may be a sum of weighted terms, ``"cat + 2:snow - dog"``; a term
that names an existing image file stands for that image's embedding. Terms
are separated by `` + `` or `` - `` with spaces around, so ``t-shirt`` is one
term.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from mmsearch.decode import decode_failure, enable_heif, load_image
from mmsearch.discover import is_image_name
from mmsearch.errors import EmptyIndexError, InputFileError, UsageError
from mmsearch.files import FileRefused, describe_os_error, not_a_file
from mmsearch.home import Home
from mmsearch.store import Kind

if TYPE_CHECKING:
    from PIL import Image

    from mmsearch.index import VectorIndex

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


def embed_image_file(home: Home, image: ImageInput) -> np.ndarray:
    """The embedding of one example image (a path, bytes or a picture) given as a query."""
    encoder = home.encoder()
    img = open_query_image(image, encoder.image_size, home.settings.max_file_size)
    return encoder.embed_images(encoder.preprocess(img).unsqueeze(0))[0]


def truncation_warnings(home: Home, query: str | None, *, files: bool = True) -> list[str]:
    """One line per text term of ``query`` longer than the model's context (it is encoded truncated)."""
    if not query:
        return []
    texts = [t.text for t in parse_query(query, files=files) if t.image is None]
    if not texts:
        return []
    encoder = home.encoder()
    tokens = encoder.tokenize(texts)
    out = []
    for text, row in zip(texts, tokens):
        if int(row[-1]) != 0:
            shown = text if len(text) <= 40 else text[:40] + "..."
            out.append(
                f"the query {shown!r} is longer than the model's {encoder.context_length}-token context "
                "and was truncated"
            )
    return out


def query_vector(home: Home, query: str | None, image: ImageInput | None, *, files: bool = True) -> np.ndarray:
    """The normalised vector of a query: text terms and/or an example image, summed."""
    if not query and image is None:
        raise UsageError("nothing to search for: give a query or an example image")
    encoder = home.encoder()
    total = np.zeros(encoder.dim, dtype=np.float32)
    if image is not None:
        total += embed_image_file(home, image)
    if query:
        terms = parse_query(query, files=files)
        texts = [t for t in terms if t.image is None]
        if texts:
            vectors = encoder.embed_texts([t.text for t in texts])
            total += sum(t.weight * v for t, v in zip(texts, vectors))
        for term in terms:
            if term.image is not None:
                total += term.weight * embed_image_file(home, term.image)
    norm = float(np.linalg.norm(total))
    if norm < 1e-6:
        raise UsageError("the query terms cancel out; nothing to search for")
    return total / norm


def search(
    home: Home,
    query: str | None = None,
    *,
    image: ImageInput | None = None,
    target: Kind = "image",
    k: int = 10,
    rerank_k: int = 0,
    on_warning: Callable[[str], None] | None = None,
    files: bool = True,
    index: "VectorIndex | None" = None,
) -> list[Hit]:
    """The ``k`` best images (or texts) for a text query and/or an example image.

    With ``rerank_k``, the best ``rerank_k`` candidates are re-scored by the
    model's cross-attention re-ranker (see :mod:`mmsearch.rerank`).
    ``on_warning`` hears of query text cut to the model's context.
    ``files=False`` reads no query term as an image path. A long-lived caller
    (:class:`mmsearch.library.Library`) passes the ``index`` it keeps.
    """
    if k < 1:
        raise UsageError(f"k must be at least 1, got {k}")
    if home.catalog.count(target) == 0:
        what = "images" if target == "image" else "texts"
        hint = "mmsearch index FOLDER" if target == "image" else "mmsearch add-texts FILE"
        raise EmptyIndexError(f"no {what} in {home.settings.home} yet; run `{hint}` first")
    if isinstance(image, (str, Path)):
        check_query_image(Path(image))
    if on_warning is not None:
        for message in truncation_warnings(home, query, files=files):
            on_warning(message)
    if rerank_k > 0:
        from mmsearch.rerank import rerank_hits, rerank_query

        vector, prepared = rerank_query(home, query, image, target, files=files)  # one encoder pass for both
        hits = nearest(home, vector, target, max(k, rerank_k), index=index)
        return rerank_hits(home, prepared, target, hits, k, rerank_k)
    return nearest(home, query_vector(home, query, image, files=files), target, k, index=index)


def nearest(home: Home, vector: np.ndarray, target: Kind, k: int, *, index: "VectorIndex | None" = None) -> list[Hit]:
    """The ``k`` nearest stored items to a query vector; vanished files are left out."""
    if index is None:
        index = home.index(target)
    fetch = k
    while True:
        scores, ids = index.search(vector[None, :], fetch)
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        hits = _resolve(home, pairs, target)
        # fewer ids than asked for: the index has no more to give (an ANN index
        # only scans some cells), so asking for more would only cost time
        if len(hits) >= k or fetch >= index.count or len(pairs) < fetch:
            break
        fetch = min(index.count, fetch * 4)
    for rank, hit in enumerate(hits[:k], 1):
        hit.rank = rank
    return hits[:k]


def _resolve(home: Home, pairs: list[tuple[float, int]], target: Kind) -> list[Hit]:
    ids = [i for _, i in pairs]
    if target == "image":
        paths = home.catalog.image_paths(ids)
        return [
            Hit(0, score, i, "image", path=paths[i])
            for score, i in pairs
            if i in paths and os.path.exists(paths[i])
        ]
    texts = home.catalog.texts_by_id(ids)
    return [
        Hit(0, score, texts[i]["key"], "text", text=texts[i]["text"], meta=texts[i]["meta"])
        for score, i in pairs
        if i in texts
    ]
