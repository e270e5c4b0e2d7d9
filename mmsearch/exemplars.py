"""Exemplar memory: the pictures a trained model was shown for each caption, as a re-ranking signal.

``mmsearch train`` keeps, for every caption of its pair file, the normalised
mean embedding of that caption's images: its *exemplar*. When a text query is
one of those captions, each candidate image's score gains
``weight × (cos(exemplar, image) - offset)``; when a candidate text is one,
the query image is compared with that text's exemplar the same way
(``offset``, the mean similarity of an exemplar and an unrelated picture,
keeps a known caption from outranking an unknown one merely for being
known). So a picture is
found not only by what the text tower makes of its caption but by how much it
looks like the pictures the user paired with that caption (another artist's
drawing of the same thing, another photo of the same dog). Texts that are not
training captions get no correction: the memory says nothing about them.

Captions match after lower-casing and collapsing white space
(:func:`caption_key`). ``train`` fits one weight per direction on its
validation split, each validation image compared with the exemplar of its
caption's *other* images (leave one out), and keeps 0 where it does not raise
validation Recall@1, so a weight of 0 is the plain ranking.

Files in a model folder: ``exemplars.safetensors`` (``vectors``: one float32
row per caption) and ``exemplars.json`` (the captions in row order, the
weights and the offset). Nothing is pickled. numpy only: no torch import here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmsearch.errors import RerankerUnavailableError

#: (query rows, candidate rows (B, K)) -> (B, K) corrections: the shape of mmsearch.evaluate.Corrections,
#: spelled out here because evaluate reaches this module through rerank (importing it would close a circle)
Corrections = Callable[[np.ndarray, np.ndarray], np.ndarray]

EXEMPLAR_WEIGHTS = "exemplars.safetensors"
EXEMPLAR_CONFIG = "exemplars.json"
DIRECTIONS = ("text_to_image", "image_to_text")
#: The weights ``train`` tries per direction (0: the ranking without exemplars).
WEIGHT_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)


def caption_key(text: str) -> str:
    """The form in which a text is looked up among the training captions."""
    return " ".join(str(text).lower().split())


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=-1, keepdims=True)
    return (rows / np.maximum(norms, 1e-12)).astype(np.float32)


@dataclass
class ExemplarMemory:
    """Captions (by :func:`caption_key`), their exemplar vectors (N, dim), a weight per direction."""

    captions: list[str]
    vectors: np.ndarray
    weights: dict[str, float] = field(default_factory=lambda: {d: 0.0 for d in DIRECTIONS})
    #: the mean cos(exemplar, picture) of a picture that is not the caption's, subtracted from every
    #: correction: a candidate text that is a training caption gains only what sets it above a random one
    offset: float = 0.0

    def __post_init__(self) -> None:
        self._rows = {caption_key(c): i for i, c in enumerate(self.captions)}

    @classmethod
    def build(cls, texts: Sequence[str], image_vectors: np.ndarray, links: Sequence[tuple[int, int]]) -> "ExemplarMemory":
        """The memory of pairs ``links`` ((image row, text row)) over ``texts`` and normalised ``image_vectors``.

        Texts that differ only in case or spacing share one exemplar.
        """
        keys: dict[str, int] = {}
        members: list[list[int]] = []
        captions: list[str] = []
        for image, text in links:
            key = caption_key(texts[text])
            if key not in keys:
                keys[key] = len(captions)
                captions.append(key)
                members.append([])
            members[keys[key]].append(image)
        dim = image_vectors.shape[1]
        vectors = np.zeros((len(captions), dim), dtype=np.float32)
        for row, images in enumerate(members):
            vectors[row] = image_vectors[sorted(set(images))].mean(axis=0)
        return cls(captions, _unit(vectors))

    @property
    def active(self) -> bool:
        """Whether any direction uses the memory."""
        return any(self.weights.get(d, 0.0) > 0 for d in DIRECTIONS)

    def rows(self, texts: Sequence[str]) -> np.ndarray:
        """Each text's row in the memory, -1 where it is not a training caption."""
        return np.array([self._rows.get(caption_key(t), -1) for t in texts], dtype=np.int64)

    def similarities(self, rows: np.ndarray, image_vectors: np.ndarray) -> np.ndarray:
        """cos(exemplar of each text row, each image vector), pair by pair; 0 where the row is -1."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros(len(rows), dtype=np.float32)
        known = rows >= 0
        if known.any():
            out[known] = np.einsum("nd,nd->n", self.vectors[rows[known]], np.asarray(image_vectors, np.float32)[known])
            out[known] -= self.offset
        return out

    def text_to_image(self, text: str, image_vectors: np.ndarray) -> np.ndarray:
        """The correction of each candidate image (rows of ``image_vectors``) for a text query."""
        weight = self.weights.get("text_to_image", 0.0)
        if weight <= 0 or len(image_vectors) == 0:
            return np.zeros(len(image_vectors), dtype=np.float32)
        rows = np.repeat(self.rows([text]), len(image_vectors))
        return weight * self.similarities(rows, image_vectors)

    def image_to_text(self, image_vector: np.ndarray, texts: Sequence[str]) -> np.ndarray:
        """The correction of each candidate text for an image query (its normalised vector)."""
        weight = self.weights.get("image_to_text", 0.0)
        if weight <= 0 or not len(texts):
            return np.zeros(len(texts), dtype=np.float32)
        return weight * self.similarities(self.rows(texts), np.repeat(np.asarray(image_vector)[None], len(texts), 0))

    def expanded_query(self, text: str, vector: np.ndarray) -> np.ndarray | None:
        """A text query's search vector that ranks every image by dual score + its correction.

        ``q·x + w (e·x − m) = (q + w e)·x − w m``: one nearest-neighbour search
        with ``q + w e`` ranks the whole collection as re-scoring each image
        would (the constant ``w m`` aside), so the memory is not limited to the
        candidates the dual encoder found. None when ``text`` is not a training
        caption or the text→image weight is 0.
        """
        weight = self.weights.get("text_to_image", 0.0)
        row = int(self.rows([text])[0])
        if weight <= 0 or row < 0:
            return None
        return (np.asarray(vector, dtype=np.float32) + weight * self.vectors[row]).astype(np.float32)

    def group_texts(self, texts: Sequence[str]) -> dict[int, list[int]]:
        """Each memory row that some of ``texts`` are captions of → their positions in ``texts``."""
        by_row: dict[int, list[int]] = {}
        for position, row in enumerate(self.rows(texts).tolist()):
            if row >= 0:
                by_row.setdefault(row, []).append(position)
        return by_row

    def lifted_texts(self, image_vector: np.ndarray, by_row: dict[int, list[int]], n: int) -> list[int]:
        """The texts (values of ``by_row``) of the ``n`` captions whose exemplars are most like an image.

        An image query's candidate texts besides the dual encoder's: those the
        memory lifts most. ``by_row`` is :meth:`group_texts` of the stored texts.
        """
        if n <= 0 or not by_row:
            return []
        rows = np.fromiter(by_row, dtype=np.int64, count=len(by_row))
        sims = self.vectors[rows] @ np.asarray(image_vector, dtype=np.float32)
        return [t for r in rows[np.argsort(-sims, kind="stable")[:n]].tolist() for t in by_row[r]]

    def corrections(self, texts: Sequence[str], image_vectors: np.ndarray, text_queries: bool) -> Corrections | None:
        """A :data:`Corrections` over ``texts`` and ``image_vectors`` (indexed by row), or None at weight 0."""
        direction = "text_to_image" if text_queries else "image_to_text"
        weight = self.weights.get(direction, 0.0)
        if weight <= 0:
            return None
        table = _pair_table(self.vectors, self.rows(texts), image_vectors, self.offset)
        return weighted_corrections(table, weight, text_queries)

    def save(self, folder: Path, info: dict | None = None) -> None:
        from safetensors.numpy import save_file

        save_file({"vectors": np.ascontiguousarray(self.vectors, dtype=np.float32)}, str(folder / EXEMPLAR_WEIGHTS))
        config = {"captions": self.captions, "weights": {d: float(self.weights.get(d, 0.0)) for d in DIRECTIONS},
                  "offset": float(self.offset), **(info or {})}
        (folder / EXEMPLAR_CONFIG).write_text(json.dumps(config, ensure_ascii=False))

    @classmethod
    def load(cls, folder: Path) -> "ExemplarMemory | None":
        """The memory saved in a model folder; None if it has none."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        if not (folder / EXEMPLAR_WEIGHTS).is_file():
            return None
        try:
            config = json.loads((folder / EXEMPLAR_CONFIG).read_text())
            vectors = load_file(str(folder / EXEMPLAR_WEIGHTS))["vectors"].astype(np.float32)
            captions = [str(c) for c in config["captions"]]
            weights = {d: float(config.get("weights", {}).get(d, 0.0)) for d in DIRECTIONS}
            offset = float(config.get("offset", 0.0))
            if vectors.ndim != 2 or len(captions) != len(vectors):
                raise ValueError(f"{len(captions)} captions for vectors of shape {vectors.shape}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError) as exc:
            raise RerankerUnavailableError(
                f"{folder} holds an exemplar memory this tool cannot read ({type(exc).__name__}: {exc})"
            ) from None
        return cls(captions, vectors, weights, offset)


def _pair_table(vectors: np.ndarray, text_rows: np.ndarray, image_vectors: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """(texts, images) cos(exemplar of the text, image) - ``offset``; 0 for texts without one."""
    table = np.zeros((len(text_rows), len(image_vectors)), dtype=np.float32)
    known = text_rows >= 0
    if known.any():
        table[known] = vectors[text_rows[known]] @ np.asarray(image_vectors, np.float32).T - offset
    return table


def weighted_corrections(table: np.ndarray, weight: float, text_queries: bool) -> Corrections | None:
    """``weight ×`` a (texts, images) table as :data:`Corrections` (None at weight 0)."""
    if weight <= 0:
        return None

    def run(rows: np.ndarray, cands: np.ndarray) -> np.ndarray:
        return weight * (table[rows[:, None], cands] if text_queries else table.T[rows[:, None], cands])

    return run


def leave_one_out_table(
    texts: Sequence[str], image_vectors: np.ndarray, links: Sequence[tuple[int, int]]
) -> np.ndarray:
    """(texts, images) exemplar similarities as a new picture of a known caption would see them.

    For a text and one of its own images, the exemplar is the mean of the
    text's *other* images (0 when it has no other); for any other image, the
    mean of all the text's images. What ``train`` fits the weights on.
    """
    memory = ExemplarMemory.build(texts, image_vectors, links)
    rows = memory.rows(texts)
    table = _pair_table(memory.vectors, rows, image_vectors)
    members: dict[int, set[int]] = {}
    for image, text in links:
        members.setdefault(int(rows[text]), set()).add(image)
    for image, text in links:
        others = sorted(members[int(rows[text])] - {image})
        exemplar = _unit(image_vectors[others].mean(axis=0, keepdims=True))[0] if others else None
        table[text, image] = float(exemplar @ image_vectors[image]) if exemplar is not None else 0.0
    return table


def unrelated_mean(table: np.ndarray, links: Sequence[tuple[int, int]]) -> float:
    """The mean of a (texts, images) table over the pairs that are not links and have an exemplar."""
    mask = table != 0
    for image, text in links:
        mask[text, image] = False
    return float(table[mask].mean()) if mask.any() else 0.0


def fit_weights(
    table: np.ndarray, score: Callable[[str, Corrections | None], float],
) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """Per direction, the weight of ``WEIGHT_GRID`` with the best ``score`` (0 unless one beats it).

    ``score(direction, corrections)`` is validation Recall@1 with those
    corrections added to the ranking (None: without). Returns the weights and
    every weight's score, for the report.
    """
    weights: dict[str, float] = {}
    tried: dict[str, dict[float, float]] = {}
    for direction in DIRECTIONS:
        text_queries = direction == "text_to_image"
        tried[direction] = {w: score(direction, weighted_corrections(table, w, text_queries)) for w in WEIGHT_GRID}
        base = tried[direction][0.0]
        best = max(WEIGHT_GRID, key=lambda w: (tried[direction][w], -w))
        weights[direction] = best if tried[direction][best] > base else 0.0
    return weights, tried
