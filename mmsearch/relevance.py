"""Relevance stage: a calibrated score that says whether a hit is a match at all.

A raw cosine score means different things for different models (one model's
0.3 is another's 0.8), and for different queries of one model (a text query
lies across the modality gap from every image). So each hit's score is
measured against the query's own scores over the collection: ``relevance``
is how many standard deviations the hit's score stands above the mean score
of the query over a fixed sample of the stored vectors (a z-score). It has
no unit, so one threshold carries over between models and queries;
``--cutoff auto`` applies :data:`AUTO_CUTOFF`, chosen on the emoji set
(``bench/cutoff.py``, ``docs/cutoff.md``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mmsearch.errors import UsageError

if TYPE_CHECKING:  # the CLI parses a cutoff before anything heavy is imported
    from mmsearch.home import Home
    from mmsearch.query import Hit
    from mmsearch.schema import Kind

#: The threshold ``--cutoff auto`` applies (see docs/cutoff.md for how it was chosen).
AUTO_CUTOFF = 2.5

#: Stored vectors the query's score distribution is measured on: enough for a
#: stable mean and spread, few enough to read from the catalog per query.
BACKGROUND_SIZE = 1024

#: The spread never counts as smaller than this: in a tiny or uniform collection
#: a spread near zero would turn a tiny score difference into a huge relevance.
MIN_SPREAD = 1e-3


def parse_cutoff(value: str | float | None) -> float | None:
    """The threshold a cutoff value names: ``auto`` (the default threshold), a number, or none."""
    if value is None or isinstance(value, float):
        return value
    text = str(value).strip().lower()
    if text == "auto":
        return AUTO_CUTOFF
    try:
        number = float(text)
    except ValueError:
        raise UsageError(f"cutoff must be 'auto' or a number, got {value!r}") from None
    if not np.isfinite(number):
        raise UsageError(f"cutoff must be a finite number, got {value!r}")
    return number


def background(home: "Home", target: Kind) -> np.ndarray:
    """A fixed sample (the same ids for the same catalog) of the stored vectors of ``target``.

    Kept with the open home until the catalog's generation of ``target``
    changes, so a long-lived process reads it once, not per query.
    """
    dim = home.dim
    if dim is None:
        return np.zeros((0, 1), dtype=np.float32)
    generation = home.catalog.generation(target)
    cached = home.derived.get(("relevance-background", target))
    if cached is not None and cached[0] == generation:
        return cached[1]
    ids = home.catalog.sample_ids(target, BACKGROUND_SIZE)
    by_id = home.catalog.vectors(target, ids.tolist(), dim)
    if not by_id:
        sample = np.zeros((0, dim), dtype=np.float32)
    else:
        sample = np.stack(list(by_id.values())).astype(np.float32, copy=False)
    home.derived[("relevance-background", target)] = (generation, sample)
    return sample


def relevance(scores: np.ndarray, vector: np.ndarray, sample: np.ndarray) -> np.ndarray:
    """How far each score stands above the query's scores over ``sample``, in standard deviations."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(sample) == 0:
        return np.zeros_like(scores)
    spread = sample @ np.asarray(vector, dtype=np.float32)
    mean, std = float(spread.mean()), max(float(spread.std()), MIN_SPREAD)
    return (scores - mean) / std


def annotate(home: "Home", vector: np.ndarray, hits: "list[Hit]", target: Kind) -> "list[Hit]":
    """The hits, each with ``relevance`` in its JSON (computed from the dual-encoder score)."""
    if not hits:
        return hits
    dual = np.array([float(h.extra.get("dual_score", h.score)) for h in hits])
    values = relevance(dual, vector, background(home, target))
    for hit, value in zip(hits, values):
        hit.extra["relevance"] = round(float(value), 4)
    return hits


def apply_cutoff(hits: "list[Hit]", cutoff: float | None) -> "list[Hit]":
    """The hits whose relevance reaches ``cutoff`` (all of them when it is None), ranked anew."""
    if cutoff is None:
        return hits
    kept = [h for h in hits if float(h.extra.get("relevance", -np.inf)) >= cutoff]
    for rank, hit in enumerate(kept, 1):
        hit.rank = rank
    return kept
