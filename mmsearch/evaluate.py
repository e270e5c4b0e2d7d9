"""Evaluation: Recall@K of text→image and image→text retrieval on a pair file.

A text's positives are the images paired with that text; an image's positives
are its texts. The pairs' images and texts are indexed into a temporary home
with the normal pipeline (so re-ranking reads the token store written at
index time), then every text and every image is used as a query.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mmsearch.errors import UsageError
from mmsearch.pairs import group, read_pairs
from mmsearch.settings import Settings

KS = (1, 5, 10)
#: corrections(query indices (B,), candidate indices (B, K)) -> (B, K) re-ranker corrections
Corrections = Callable[[np.ndarray, np.ndarray], np.ndarray]


#: extra(query index) -> candidate indices to re-rank besides the query's top K
ExtraCandidates = Callable[[int], np.ndarray]


def positive_ranks(
    scores: np.ndarray, positives: np.ndarray, corrections: Corrections | None = None, rerank_k: int = 50,
    chunk: int = 32, extra: ExtraCandidates | None = None,
) -> np.ndarray:
    """0-based rank of each query's best-placed positive (``len`` if it has none).

    ``scores`` (Q, N) are dual-encoder scores, ``positives`` a (Q, N) bool
    matrix. With ``corrections``, each query's top ``rerank_k`` candidates are
    re-ordered by score + correction; the rest keep their places. ``extra``
    adds candidates per query to those re-ordered (as
    :func:`mmsearch.search.memory_text_candidates` does); the rest follow them.
    """
    q_count, n = scores.shape
    ranks = np.full(q_count, n, dtype=np.int64)
    k = min(rerank_k, n)
    for start in range(0, q_count, chunk):
        rows = np.arange(start, min(q_count, start + chunk))
        order = np.argsort(-scores[rows], axis=1, kind="stable")
        if corrections is not None and k > 0 and extra is not None:
            for b, row in enumerate(rows.tolist()):
                top = order[b, :k]
                more = np.asarray(extra(row), dtype=np.int64)
                cands = np.concatenate([top, more[~np.isin(more, top)]])
                final = scores[row, cands] + corrections(np.array([row]), cands[None])[0]
                head = cands[np.argsort(-final, kind="stable")]
                order[b] = np.concatenate([head, order[b][~np.isin(order[b], head)]])
        elif corrections is not None and k > 0:
            top = order[:, :k]
            final = np.take_along_axis(scores[rows], top, axis=1) + corrections(rows, top)
            order[:, :k] = np.take_along_axis(top, np.argsort(-final, axis=1, kind="stable"), axis=1)
        hit = np.take_along_axis(positives[rows], order, axis=1)
        found = hit.any(axis=1)
        ranks[rows[found]] = hit[found].argmax(axis=1)
    return ranks


def combined(*parts: Corrections | None) -> Corrections | None:
    """The sum of several :data:`Corrections` (None ones left out; None if all are)."""
    present = [p for p in parts if p is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]

    def run(rows: np.ndarray, cands: np.ndarray) -> np.ndarray:
        return sum(p(rows, cands) for p in present)

    return run


def memory_text_candidates(memory: Any, texts: list[str], image_vectors: np.ndarray, n: int) -> ExtraCandidates:
    """Per image query, the texts of the ``n`` captions whose exemplars are most like it (search's candidates)."""
    by_row = memory.group_texts(texts)
    return lambda query: np.array(memory.lifted_texts(image_vectors[query], by_row, n), dtype=np.int64)


def everywhere(scores: np.ndarray, corrections: Corrections | None) -> np.ndarray:
    """``scores`` (Q, N) with ``corrections`` added to every candidate, not only the top K.

    What a text query's search sees with an exemplar memory: its search vector
    carries the memory (:meth:`mmsearch.exemplars.ExemplarMemory.expanded_query`).
    """
    if corrections is None:
        return scores
    rows = np.arange(scores.shape[0])
    return scores + corrections(rows, np.broadcast_to(np.arange(scores.shape[1]), scores.shape))


def recalls(ranks: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    if len(ranks) == 0:
        return {f"R@{k}": 0.0 for k in ks}
    return {f"R@{k}": round(float(np.mean(ranks < k)), 4) for k in ks}


def scorer_corrections(
    scorer: Any, text_states: Any, text_mask: Any, image_tokens: Any, text_queries: bool, batch: int = 2048
) -> Corrections:
    """A :data:`Corrections` over precomputed token states (torch tensors, indexed by row).

    ``text_queries``: queries index texts and candidates images, else the reverse.
    """
    import torch

    device = next(scorer.parameters()).device  # states stay in host memory; batches go to the scorer

    def run(rows: np.ndarray, cands: np.ndarray) -> np.ndarray:
        q = np.repeat(rows, cands.shape[1])
        c = cands.reshape(-1)
        t_idx, i_idx = (q, c) if text_queries else (c, q)
        out = []
        with torch.inference_mode():
            for s in range(0, len(t_idx), batch):
                t = torch.from_numpy(t_idx[s:s + batch])
                i = torch.from_numpy(i_idx[s:s + batch])
                text, mask, image = (x.to(device) for x in (text_states[t], text_mask[t], image_tokens[i]))
                out.append(scorer(text, mask, image).float().cpu().numpy())
        return np.concatenate(out).reshape(cands.shape)

    return run


def text_states_padded(model: Any, tokenizer: Any, texts: list[str], device: str, batch: int = 256) -> tuple[Any, Any]:
    """Token states (N, L, dim) float32 and masks (N, L) of many texts, padded to one length."""
    import torch

    from mmsearch.towers import text_token_states

    states, masks = [], []
    with torch.inference_mode():
        for s in range(0, len(texts), batch):
            x, m = text_token_states(model, tokenizer(texts[s:s + batch]).to(device))
            states.append(x.float().cpu())
            masks.append(m.cpu())
    length = max(x.shape[1] for x in states)
    states = [torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1])) for x in states]
    masks = [torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks]
    return torch.cat(states), torch.cat(masks)


def evaluate(
    pairs_path: Path, settings: Settings, *, rerank: bool = False, rerank_k: int = 50, progress: bool = True,
    on_skip: Callable[[str, str], None] | None = None,
) -> dict[str, Any]:
    """Recall@1/5/10 both ways for the model in ``settings`` on a pair file (temporary home)."""
    from mmsearch.home import Home
    from mmsearch.indexer import index_paths
    from mmsearch.texts import add_texts

    if rerank_k < 1:
        raise UsageError(f"--rerank-k must be at least 1, got {rerank_k}")
    pairs = read_pairs(pairs_path)
    images, texts, links = group(pairs)
    with tempfile.TemporaryDirectory(prefix="mmsearch-eval-") as tmp:
        # a SQLite catalog of its own, even where the home's is on a server: nothing shared is touched
        temp = dataclasses.replace(settings, home=Path(tmp) / "home", catalog=None)
        with Home.open(temp) as home:
            index_paths(home, [str(p) for p in images], progress=progress, on_skip=on_skip)
            corpus = Path(tmp) / "texts.jsonl"
            corpus.write_text("".join(json.dumps({"id": f"t{j}", "text": t}) + "\n" for j, t in enumerate(texts)))
            add_texts(home, corpus, progress=progress)
            return _score(home, images, texts, links, rerank, rerank_k)


def _score(home: Any, images: list[Path], texts: list[str], links: list[tuple[int, int]], rerank: bool, rerank_k: int) -> dict[str, Any]:
    import torch

    catalog = home.catalog
    states = catalog.image_states()
    by_path = {os.path.realpath(p): s for p, s in states.items()}
    kept = [i for i, p in enumerate(images) if os.path.realpath(p) in by_path]  # skipped files drop out
    image_ids = np.array([by_path[os.path.realpath(images[i])].id for i in kept], dtype=np.int64)
    text_rows = catalog.text_states([f"t{j}" for j in range(len(texts))])
    text_ids = np.array([text_rows[f"t{j}"][0] for j in range(len(texts))], dtype=np.int64)
    dim = home.dim
    vectors = {kind: dict() for kind in ("image", "text")}
    for kind in ("image", "text"):
        for ids, vecs in catalog.iter_vectors(kind, dim):
            vectors[kind].update(zip(ids.tolist(), vecs))
    img = np.stack([vectors["image"][int(i)] for i in image_ids])
    txt = np.stack([vectors["text"][int(i)] for i in text_ids])
    position = {orig: new for new, orig in enumerate(kept)}
    positives = np.zeros((len(texts), len(kept)), dtype=bool)
    for i, j in links:
        if i in position:
            positives[j, position[i]] = True
    sims = t2i_sims = txt @ img.T
    t2i_corr = i2t_corr = None
    i2t_extra: ExtraCandidates | None = None
    if rerank:
        from mmsearch.rerank import CaptionReranker, Reranker, TokenStore

        encoder = home.encoder()
        reranker = Reranker.load(encoder)
        store = TokenStore.open(home.settings.home, encoder.spec.canonical)
        hashes = catalog.image_hashes(image_ids.tolist())
        rows = store.get([hashes[int(i)] for i in image_ids]) if store is not None else []
        if len(rows) != len(image_ids) or any(r is None for r in rows):
            raise UsageError("the index holds no re-ranker tokens for some images; was it built with this model?")
        image_tokens = torch.from_numpy(np.stack(rows))
        if isinstance(reranker, CaptionReranker):
            t2i_corr = reranker.corrections(reranker.log_likelihood_table(texts, image_tokens, True), "text_to_image")
            i2t_corr = reranker.corrections(reranker.log_likelihood_table(texts, image_tokens, False), "image_to_text")
        else:
            if reranker.directions:  # the scorer's text states, only where it re-scores
                text_states, text_mask = text_states_padded(encoder.text_model, encoder.tokenizer, texts, encoder.device)
            scorer = reranker.scorer
            if "text_to_image" in reranker.directions:  # elsewhere the dual-encoder ranking, as search gives
                t2i_corr = scorer_corrections(scorer, text_states, text_mask, image_tokens, text_queries=True)
            if "image_to_text" in reranker.directions:
                i2t_corr = scorer_corrections(scorer, text_states, text_mask, image_tokens, text_queries=False)
            if reranker.exemplars is not None:  # the training pictures of known captions (mmsearch.exemplars)
                # a text query's search vector carries the memory: every image gets it, not only the top K
                t2i_sims = everywhere(sims, reranker.exemplars.corrections(texts, img, text_queries=True))
                i2t_corr = combined(i2t_corr, reranker.exemplars.corrections(texts, img, text_queries=False))
                if reranker.uses_exemplars("image_to_text"):
                    i2t_extra = memory_text_candidates(reranker.exemplars, texts, img, rerank_k)
    has_image = positives.any(axis=1)
    t2i = positive_ranks(t2i_sims, positives, t2i_corr, rerank_k)[has_image]
    i2t = positive_ranks(np.ascontiguousarray(sims.T), np.ascontiguousarray(positives.T), i2t_corr, rerank_k,
                         extra=i2t_extra)
    return {
        "text_to_image": recalls(t2i),
        "image_to_text": recalls(i2t),
        "rerank": rerank,
        "images": len(kept),
        "texts": len(texts),
    }
