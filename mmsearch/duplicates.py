"""Duplicates: groups of copies in the collection.

- ``exact``: the same bytes at different paths. Grouped by the content hash the
  catalog keeps, then confirmed by comparing the files byte for byte, so a file
  changed since it was indexed never lands in a group it no longer belongs to.
- ``near``: the same picture re-encoded, resized, lightly cropped or
  recoloured. Candidate pairs come from the stored vectors (cosine
  :data:`NEAR_CANDIDATES`); each is confirmed by its pixels: the best
  normalised cross-correlation of small colour thumbnails of one image and of
  crops of the other (brightness and contrast drop out of a correlation,
  re-encoding and resizing barely change it, crops are tried). Embeddings
  alone confuse distinct pictures of similar things and move too much under
  crops and brightness changes; pixels alone would read every file.
- ``similar``: pictures of the same scene or subject: stored vectors whose
  cosine similarity reaches a lower threshold.

Pairs come from a FAISS range search over the catalog's vectors (exact below
:data:`EXACT_MAX`, an inverted-file index above it). Groups are formed around
leaders, not by chaining pairs: the item with the strongest pair starts a group
and takes every still-ungrouped item within the threshold of it, so every
member of a group is within the threshold of its first item and a chain of
gradually changing pictures never becomes one giant group. The thresholds were
chosen on generated copies of real images (``bench/duplicates.py``,
``docs/duplicates.md``).
"""

from __future__ import annotations

import filecmp
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Literal

import numpy as np

from mmsearch.errors import UsageError

if TYPE_CHECKING:
    from mmsearch.home import Home

DuplicateKind = Literal["exact", "near", "similar"]
DUPLICATE_KINDS: tuple[DuplicateKind, ...] = ("exact", "near", "similar")

#: Default thresholds (see docs/duplicates.md): near, the pixel correlation; similar, the vectors' cosine.
THRESHOLDS: dict[str, float] = {"near": 0.95, "similar": 0.85}

#: Cosine similarity of stored vectors at which a pair becomes a candidate near-duplicate.
NEAR_CANDIDATES = 0.80

#: Side of the thumbnails compared, and of the decoded picture they are cut from.
THUMB, DECODED = 32, 64

#: Crops of an image tried against the other: (share of each side kept, positions along each axis).
ALIGNMENTS: tuple[tuple[float, tuple[float, ...]], ...] = (
    (1.0, (0.0,)), *((scale, (0.0, 0.25, 0.5, 0.75, 1.0)) for scale in (0.96, 0.93, 0.9)),
)

#: Up to this many vectors, pairs come from an exact search; above, from an IVF index.
EXACT_MAX = 20_000

#: Queries per range search call: bounds the memory of one call's results.
QUERY_BLOCK = 4096

#: More candidate pairs than this means the threshold is far too low for the collection.
MAX_PAIRS = 20_000_000


@dataclass
class Group:
    """Items that are copies of each other; ``score``: the weakest similarity to the first item."""

    kind: str
    score: float
    items: list[tuple[int, str]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "score": round(float(self.score), 6),
            "items": [{"id": i, "path": p} for i, p in self.items],
        }


def find_duplicates(
    home: "Home",
    kind: str = "near",
    threshold: float | None = None,
    exists: Callable[[str], bool] = os.path.exists,
) -> list[Group]:
    """Groups of duplicates of ``kind`` among the home's images, best groups first.

    Files that vanished since indexing are left out, as search leaves them out.
    """
    if kind not in DUPLICATE_KINDS:
        raise UsageError(f"--kind must be one of {', '.join(DUPLICATE_KINDS)}, got {kind!r}")
    if kind == "exact":
        if threshold is not None:
            raise UsageError("--threshold applies to --kind near and similar, not exact")
        return exact_groups(home)
    limit = THRESHOLDS[kind] if threshold is None else float(threshold)
    if not -1.0 <= limit <= 1.0:
        raise UsageError(f"--threshold is a cosine similarity between -1 and 1, got {threshold}")
    return vector_groups(home, kind, limit, exists)


def exact_groups(home: "Home") -> list[Group]:
    """Files with the same content hash, split into sets of byte-identical files."""
    by_hash: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for path, state in home.catalog.image_states().items():
        by_hash[state.content_hash].append((state.id, path))
    groups = []
    for items in by_hash.values():
        if len(items) < 2:
            continue
        for same in _byte_identical(sorted(items)):
            if len(same) > 1:
                groups.append(Group("exact", 1.0, same))
    groups.sort(key=lambda g: (-len(g.items), g.items[0][0]))
    return groups


def _byte_identical(items: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """``items`` split into sets whose files have the same bytes; unreadable files are left out."""
    sets: list[list[tuple[int, str]]] = []
    for item in items:
        if not os.path.isfile(item[1]):
            continue
        for same in sets:
            try:
                if filecmp.cmp(same[0][1], item[1], shallow=False):
                    same.append(item)
                    break
            except OSError:
                break
        else:
            sets.append([item])
    return sets


def vector_groups(
    home: "Home", kind: str, threshold: float, exists: Callable[[str], bool] = os.path.exists
) -> list[Group]:
    """Groups of images whose stored vectors are within ``threshold`` cosine similarity."""
    dim = home.dim
    if dim is None or home.catalog.count("image") == 0:
        return []
    parts = list(home.catalog.iter_vectors("image", dim))
    ids = np.concatenate([p[0] for p in parts])
    vectors = np.ascontiguousarray(np.concatenate([p[1] for p in parts]), dtype=np.float32)
    first, second, scores = similar_pairs(vectors, NEAR_CANDIDATES if kind == "near" else threshold)
    paths = home.catalog.image_paths(ids.tolist())
    present = np.array([exists(paths.get(int(i), "")) for i in ids], dtype=bool)
    keep = present[first] & present[second]
    if kind == "near":
        first, second = first[keep], second[keep]
        scores = pixel_similarity([paths.get(int(i), "") for i in ids], first, second)
        keep = scores >= threshold
    groups = []
    for members, score in leader_groups(len(ids), first[keep], second[keep], scores[keep]):
        groups.append(Group(kind, score, [(int(ids[m]), paths[int(ids[m])]) for m in members]))
    return groups


def pixel_similarity(paths: list[str], first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """For each pair ``(paths[first[k]], paths[second[k]])``, how alike their pixels are.

    The best normalised cross-correlation between one image's thumbnail and
    the thumbnails of crops of the other, either way round (1: the same
    picture up to brightness and contrast). A file that cannot be read scores -1.
    Only the files of candidate pairs are decoded, each once.
    """
    pictures: dict[int, np.ndarray | None] = {}
    for row in sorted(set(first.tolist()) | set(second.tolist())):
        pictures[row] = _small_picture(paths[row])
    whole = {row: _views(pic, whole_only=True)[0] for row, pic in pictures.items() if pic is not None}
    scores = np.full(len(first), -1.0, dtype=np.float32)
    by_row: dict[int, list[int]] = defaultdict(list)
    for k, (a, b) in enumerate(zip(first.tolist(), second.tolist())):
        if a in whole and b in whole:
            by_row[a].append(k)
            by_row[b].append(k)
    for row, pairs in by_row.items():
        views = _views(pictures[row])  # type: ignore[arg-type]
        others = [int(second[k]) if int(first[k]) == row else int(first[k]) for k in pairs]
        best = (np.stack([whole[o] for o in others]) @ views.T).max(axis=1)
        scores[pairs] = np.maximum(scores[pairs], best)
    return scores


def _small_picture(path: str) -> np.ndarray | None:
    """The picture as mmsearch decodes it (oriented, over white), squeezed to DECODED² pixels."""
    from PIL import Image

    from mmsearch.decode import load_image

    try:
        img = load_image(path, DECODED)
    except Exception:  # a file changed or damaged since indexing: no pair with it
        return None
    return np.asarray(img.resize((DECODED, DECODED), Image.BILINEAR), dtype=np.float32)


def _views(picture: np.ndarray, whole_only: bool = False) -> np.ndarray:
    """Mean-centred unit-norm thumbnails of the picture and of its crops (:data:`ALIGNMENTS`), one per row.

    The first row is the whole picture; ``whole_only`` makes only that one.
    """
    from PIL import Image

    img = Image.fromarray(picture.astype(np.uint8))
    side = float(DECODED)
    out = []
    for scale, positions in ALIGNMENTS[:1] if whole_only else ALIGNMENTS:
        cut = side * scale
        for fx in positions:
            for fy in positions:
                x, y = (side - cut) * fx, (side - cut) * fy
                box = (x, y, x + cut, y + cut)
                view = np.asarray(img.resize((THUMB, THUMB), Image.BILINEAR, box=box), dtype=np.float32).ravel()
                view = view - view.mean()
                out.append(view / (np.linalg.norm(view) + 1e-6))
    return np.stack(out)


def similar_pairs(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair ``(i, j)``, ``i < j``, of rows with cosine similarity at least ``threshold``.

    Returns row indices and similarities as three arrays.
    """
    import faiss

    n, dim = vectors.shape
    if n < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    if n <= EXACT_MAX:
        index: Any = faiss.IndexFlatIP(dim)
    else:
        # near copies lie far closer to each other than to a cell boundary: a few cells suffice
        nlist = 1 << int(round(np.log2(max(64, 2 * int(np.sqrt(n))))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = vectors[np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)]
        index.train(sample)
        index.nprobe = 2
    index.add(vectors)
    # range_search keeps scores strictly above the radius; step just below it to keep ties
    radius = float(np.nextafter(np.float32(threshold), np.float32(-2.0)))
    firsts, seconds, sims = [], [], []
    total = 0
    for start in range(0, n, QUERY_BLOCK):
        lims, found_scores, found = index.range_search(vectors[start:start + QUERY_BLOCK], radius)
        rows = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims).astype(np.int64))
        upper = found > rows  # each pair once, and never an item with itself
        firsts.append(rows[upper])
        seconds.append(found[upper].astype(np.int64))
        sims.append(found_scores[upper])
        total += int(upper.sum())
        if total > MAX_PAIRS:
            raise UsageError(
                f"more than {MAX_PAIRS:,} pairs reach similarity {threshold}: raise --threshold"
            )
    return np.concatenate(firsts), np.concatenate(seconds), np.concatenate(sims)


def leader_groups(
    n: int, first: np.ndarray, second: np.ndarray, scores: np.ndarray
) -> list[tuple[list[int], float]]:
    """Groups of ``n`` items from scored pairs: ``(members, score)``, best first.

    The ungrouped item with the strongest remaining pair leads a group that
    takes every ungrouped item paired with it; the group's score is its
    weakest pair with the leader.
    """
    neighbours: list[dict[int, float]] = [dict() for _ in range(n)] if len(first) else []
    best = np.full(n, -np.inf)
    for a, b, s in zip(first.tolist(), second.tolist(), scores.tolist()):
        neighbours[a][b] = s
        neighbours[b][a] = s
        best[a] = max(best[a], s)
        best[b] = max(best[b], s)
    grouped = np.zeros(n, dtype=bool)
    groups: list[tuple[list[int], float]] = []
    for leader in np.lexsort((np.arange(n), -best)).tolist():
        if grouped[leader] or best[leader] == -np.inf:
            continue
        members = sorted(
            (m for m in neighbours[leader] if not grouped[m]), key=lambda m: (-neighbours[leader][m], m)
        )
        if not members:
            continue
        grouped[leader] = True
        grouped[members] = True
        groups.append(([leader, *members], min(neighbours[leader][m] for m in members)))
    groups.sort(key=lambda g: (-g[1], -len(g[0]), g[0][0]))
    return groups
