"""Search stage: turn a query into a vector and find the nearest images or texts.

A text query may be a sum of weighted terms, ``"cat + 2:snow - dog"``; a term
that names an existing image file stands for that image's embedding. Terms
are separated by `` + `` or `` - `` with spaces around, so ``t-shirt`` is one
term.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch.decode import enable_heif, load_image
from mmsearch.discover import is_image_name
from mmsearch.errors import EmptyIndexError, InputFileError, UsageError
from mmsearch.home import Home
from mmsearch.store import Kind

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


def parse_query(query: str) -> list[Term]:
    """Split ``"a + 2:b - c"`` into weighted terms; image paths become image terms."""
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
        candidate = Path(text).expanduser()
        image = candidate if is_image_name(text) and candidate.is_file() else None
        terms.append(Term(sign * weight, text, image))
    if not terms:
        raise UsageError("empty query: give some text, or --image FILE")
    return terms


def embed_image_file(home: Home, path: Path) -> np.ndarray:
    """The embedding of one image file given as a query."""
    enable_heif()
    encoder = home.encoder()
    if not path.is_file():
        raise InputFileError(f"no such image: {path}")
    try:
        img = load_image(str(path), encoder.image_size)
    except Exception as exc:
        raise InputFileError(f"{path} is not an image this tool can read ({type(exc).__name__})") from None
    return encoder.embed_images(encoder.preprocess(img).unsqueeze(0))[0]


def query_vector(home: Home, query: str | None, image: Path | None) -> np.ndarray:
    """The normalised vector of a query: text terms and/or an example image, summed."""
    if not query and image is None:
        raise UsageError("nothing to search for: give a QUERY, or --image FILE")
    encoder = home.encoder()
    total = np.zeros(encoder.dim, dtype=np.float32)
    if image is not None:
        total += embed_image_file(home, image)
    if query:
        terms = parse_query(query)
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
    image: Path | None = None,
    target: Kind = "image",
    k: int = 10,
    rerank_k: int = 0,
    cutoff: float | None = None,
) -> list[Hit]:
    """The ``k`` best images (or texts) for a text query and/or an example image.

    With ``rerank_k``, the best ``rerank_k`` candidates are re-scored by the
    model's cross-attention re-ranker (see :mod:`mmsearch.rerank`). Every hit
    carries a calibrated ``relevance`` (:mod:`mmsearch.relevance`); with
    ``cutoff``, hits below it are left out (possibly all of them).
    """
    from mmsearch.relevance import annotate, apply_cutoff

    if k < 1:
        raise UsageError(f"--top-k must be at least 1, got {k}")
    if home.catalog.count(target) == 0:
        what = "images" if target == "image" else "texts"
        hint = "mmsearch index FOLDER" if target == "image" else "mmsearch add-texts FILE"
        raise EmptyIndexError(f"no {what} in {home.settings.home} yet; run `{hint}` first")
    if rerank_k > 0:
        from mmsearch.rerank import rerank_hits, rerank_query

        vector, prepared = rerank_query(home, query, image, target)  # one encoder pass for both
        hits = nearest(home, vector, target, max(k, rerank_k))
        hits = rerank_hits(home, prepared, target, hits, k, rerank_k)
    else:
        vector = query_vector(home, query, image)
        hits = nearest(home, vector, target, k)
    return apply_cutoff(annotate(home, vector, hits, target), cutoff)


def nearest(home: Home, vector: np.ndarray, target: Kind, k: int) -> list[Hit]:
    """The ``k`` nearest stored items to a query vector; vanished files are left out."""
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
