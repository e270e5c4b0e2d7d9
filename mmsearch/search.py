"""Search stage: turn a query into a vector, find the nearest images or texts, re-rank them.

What a query is (terms, example images) and what a hit is live in
:mod:`mmsearch.query`; the re-ranking model and its token store in
:mod:`mmsearch.rerank`. This module holds the search-side half of
re-ranking: preparing the query once for both the dual encoder and the
re-ranker, and re-scoring the first candidates.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmsearch.errors import EmptyIndexError, UsageError
from mmsearch.home import Home
from mmsearch.query import Hit, ImageInput, Term, check_query_image, open_query_image, parse_query
from mmsearch.schema import Kind

if TYPE_CHECKING:
    from mmsearch.encode import Encoder
    from mmsearch.exemplars import ExemplarMemory
    from mmsearch.index import VectorIndex

__all__ = [
    "Hit", "ImageInput", "Term", "nearest", "parse_query", "query_vector", "rerank_hits", "rerank_query", "search",
]


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
    cutoff: float | None = None,
) -> list[Hit]:
    """The ``k`` best images (or texts) for a text query and/or an example image.

    With ``rerank_k``, the best ``rerank_k`` candidates are re-scored by the
    model's cross-attention re-ranker (see :mod:`mmsearch.rerank`). Every hit
    carries a calibrated ``relevance`` (:mod:`mmsearch.relevance`); with
    ``cutoff``, hits below it are left out (possibly all of them).
    ``on_warning`` hears of query text cut to the model's context.
    ``files=False`` reads no query term as an image path. A long-lived caller
    (:class:`mmsearch.library.Library`) passes the ``index`` it keeps.
    """
    from mmsearch.relevance import annotate, apply_cutoff

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
        vector, prepared = rerank_query(home, query, image, target, files=files)  # one encoder pass for both
        first = memory_search_vector(home, prepared, vector) if target == "image" else None
        hits = nearest(home, vector if first is None else first, target, max(k, rerank_k), index=index)
        extra = memory_text_candidates(home, vector, hits[:rerank_k], rerank_k) if target == "text" else []
        if extra:  # re-scored with the dual encoder's best rerank_k; the rest keep their places after them
            taken = {h.id for h in extra}
            head = hits[:rerank_k] + extra
            hits, rerank_k = head + [h for h in hits[rerank_k:] if h.id not in taken], len(head)
        hits = rerank_hits(home, prepared, target, hits, k, rerank_k, vector=vector)
    else:
        vector = query_vector(home, query, image, files=files)
        hits = nearest(home, vector, target, k, index=index)
    return apply_cutoff(annotate(home, vector, hits, target), cutoff)


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


# -- the search side of re-ranking ---------------------------------------------


def _image_with_tokens(encoder: "Encoder", image: ImageInput) -> tuple[np.ndarray, np.ndarray]:
    """(normalised embedding, patch tokens) of one image (path, bytes or picture): one decode, one tower pass."""
    img = open_query_image(image, encoder.image_size)
    vectors, tokens = encoder.embed_images_with_tokens(encoder.preprocess(img).unsqueeze(0))
    return vectors[0], tokens[0]


def _images_tokens(encoder: "Encoder", paths: list[Path], batch: int = 16) -> list[np.ndarray]:
    """The re-ranker's tokens of image files, decoded and encoded in batches."""
    import torch

    out: list[np.ndarray] = []
    for s in range(0, len(paths), batch):
        pixels = torch.stack([encoder.preprocess(open_query_image(p, encoder.image_size)) for p in paths[s:s + batch]])
        out.extend(encoder.embed_images_with_tokens(pixels)[1])
    return out


def rerank_query(
    home: Home, query: str | None, image: ImageInput | None, target: str, *, files: bool = True
) -> tuple[np.ndarray, Any]:
    """(search vector, what the re-ranker needs of the query), from one encoder pass.

    Text→image: the text's projected token states; the end-of-text state is
    the dual-encoder embedding, so the text tower runs once (a CoCa model's
    decoder reads the text itself). Image→text: the image is decoded and
    encoded once for both its vector and its patch (or decoder) tokens.
    """
    import torch

    from mmsearch.rerank import TextStates
    from mmsearch.towers import is_coca, text_token_states

    encoder = home.encoder()
    if target == "image":
        if image is not None or not query:
            raise UsageError("re-ranking images needs a text query, not an example image")
        terms = parse_query(query, files=files)
        if len(terms) != 1 or terms[0].image is not None or terms[0].weight != 1.0:
            raise UsageError("re-ranking needs a plain text query, not query arithmetic")
        if is_coca(encoder.model):
            return encoder.embed_texts([terms[0].text])[0], terms[0].text
        with torch.inference_mode():
            tokens = encoder.tokenize([terms[0].text]).to(encoder.device)
            states, mask = text_token_states(encoder.text_model, tokens)
            vector = torch.nn.functional.normalize(states[0, int(mask[0].sum()) - 1].float(), dim=-1)
        return vector.cpu().numpy().astype(np.float32), TextStates(states, mask, terms[0].text)
    if image is None or query:
        raise UsageError("re-ranking texts needs an example image alone (no text query)")
    return _image_with_tokens(encoder, image)


def memory_search_vector(home: Home, prepared: Any, vector: np.ndarray) -> np.ndarray | None:
    """The search vector of a text query that is a training caption of the model's exemplar memory.

    It ranks the whole collection by dual score plus the memory's correction
    (:meth:`mmsearch.exemplars.ExemplarMemory.expanded_query`), so a picture
    that looks like the caption's training pictures is found even where the
    dual encoder alone ranks it past the re-ranked candidates. None otherwise.
    """
    from mmsearch.rerank import Reranker, TextStates

    reranker = Reranker.load(home.encoder())
    if not isinstance(reranker, Reranker) or not isinstance(prepared, TextStates):
        return None
    if not reranker.uses_exemplars("text_to_image"):
        return None
    assert reranker.exemplars is not None
    return reranker.exemplars.expanded_query(prepared.text, vector)


def memory_text_candidates(home: Home, vector: np.ndarray, found: list[Hit], n: int) -> list[Hit]:
    """Texts an image query's exemplar memory lifts most, besides the dual encoder's ``found``.

    The texts of the ``n`` training captions whose exemplars are most like the
    query image (:meth:`mmsearch.exemplars.ExemplarMemory.lifted_texts`), each
    with its dual score, so that re-ranking can put a known caption first even
    where the dual encoder alone ranked it past the re-ranked candidates.
    Empty when the model's memory does not re-rank image→text.
    """
    from mmsearch.rerank import Reranker

    reranker = Reranker.load(home.encoder())
    if not isinstance(reranker, Reranker) or not reranker.uses_exemplars("image_to_text"):
        return []
    assert reranker.exemplars is not None
    ids = reranker.exemplars.lifted_texts(vector, caption_texts(home, reranker.exemplars), n)
    seen = {h.id for h in found}
    vectors = home.catalog.vectors("text", ids, home.dim or 0)
    pairs = [(float(np.asarray(vector, np.float32) @ vectors[i]), i) for i in ids if i in vectors]
    return [h for h in _resolve(home, pairs, "text") if h.id not in seen]


def caption_texts(home: Home, memory: "ExemplarMemory") -> dict[int, list[int]]:
    """Each memory row that some stored text is a caption of → those texts' catalog ids.

    Read from the catalog once per generation of its texts and kept with the
    open home (a long-lived process reads it once).
    """
    generation = home.catalog.generation("text")
    cached = home.derived.get(("exemplar-texts", "text"))
    if cached is not None and cached[0] == generation and cached[1][0] is memory:
        return cached[1][1]
    by_row: dict[int, list[int]] = {}
    for chunk in home.catalog.iter_texts():
        for row, positions in memory.group_texts([t for _, t in chunk]).items():
            by_row.setdefault(row, []).extend(chunk[p][0] for p in positions)
    home.derived[("exemplar-texts", "text")] = (generation, (memory, by_row))
    return by_row


def rerank_hits(
    home: Home, prepared: Any, target: str, hits: list[Hit], k: int, rerank_k: int, *, vector: np.ndarray | None = None
) -> list[Hit]:
    """Re-score the first ``rerank_k`` hits with the home model's re-ranker; the best ``k``.

    ``prepared`` is the query as :func:`rerank_query` returned it, ``vector``
    the query's search vector (an exemplar memory compares an image query's
    vector with the candidate texts' exemplars).
    """
    from mmsearch.rerank import Reranker, TokenStore

    encoder = home.encoder()
    reranker = Reranker.load(encoder)
    head, rest = hits[:rerank_k], hits[rerank_k:]
    if target == "image":
        hashes = home.catalog.image_hashes([int(h.id) for h in head])
        store = TokenStore.open(home.settings.home, encoder.spec.canonical)
        stored = store.get([hashes[int(h.id)] for h in head]) if store is not None else [None] * len(head)
        missing = [i for i, tokens in enumerate(stored) if tokens is None]
        if missing:  # indexed before the store existed: read those files again, one tower pass
            stored = list(stored)
            for i, tokens in zip(missing, _images_tokens(encoder, [Path(str(head[i].path)) for i in missing])):
                stored[i] = tokens
        candidates = [{"id": hit.id, "score": hit.score, "tokens": tokens} for hit, tokens in zip(head, stored)]
        if reranker.uses_exemplars("text_to_image") and hits:
            # the hits may come from the memory's search vector (memory_search_vector): each one's dual
            # score is recomputed from its stored vector, and the re-ranker adds the memory to it
            dim = home.dim or 0
            vectors = home.catalog.vectors("image", [int(h.id) for h in hits], dim)
            text = prepared.text  # a TextStates: only a CLIP-style model's re-ranker uses a memory
            for hit in hits:
                if int(hit.id) in vectors and vector is not None:
                    hit.score = float(np.asarray(vector, np.float32) @ vectors[int(hit.id)])
            for candidate, hit in zip(candidates, head):  # one removed since the search gets no correction
                candidate["score"] = hit.score
                candidate["vector"] = vectors.get(int(candidate["id"]), np.zeros(dim, dtype=np.float32))
            for hit in rest:  # past the re-ranked ones: dual score + the memory, as they were ranked
                if int(hit.id) in vectors:
                    hit.extra["dual_score"] = round(float(hit.score), 6)
                    hit.score += float(reranker.exemplars.text_to_image(text, vectors[int(hit.id)][None])[0])
    else:
        candidates = [{"id": h.id, "score": h.score, "text": h.text or ""} for h in head]
    scores = reranker.score(prepared, candidates, query_vector=vector)
    order = np.argsort(-scores, kind="stable")
    reranked = []
    for i in order:
        hit = head[i]
        hit.extra["dual_score"] = round(float(hit.score), 6)
        hit.score = float(scores[i])
        reranked.append(hit)
    final = (reranked + rest)[:k]
    for rank, hit in enumerate(final, 1):
        hit.rank = rank
    return final
