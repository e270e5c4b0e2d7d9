"""Rerank stage: a cross-attention model re-scores the dual encoder's best candidates.

Two kinds of re-ranker, one interface (``score(query, candidates)``):

- :class:`Reranker`, trained by ``mmsearch train``: the text's token states
  attend over the image's patch tokens; the attended features are read out as
  one number, a *correction* added to the dual-encoder cosine score. The
  read-out's last layer starts at zero, so an untrained re-ranker returns
  exactly the dual-encoder ranking.
- :class:`CaptionReranker`, for open_clip CoCa models: the model's own text
  decoder, which cross-attends over the image's tokens, gives log p(text |
  image); the correction is ``weight × log-likelihood / logit_scale``, so the
  fused score ranks as ``logit_scale × cosine + weight × log-likelihood`` (a
  product of the contrastive and the captioning model). Weight 0 is the dual
  encoder alone; ``mmsearch train`` fits one weight per direction.

A trained model may also hold an exemplar memory (:mod:`mmsearch.exemplars`):
the mean embedding of each training caption's pictures, whose weighted
cosine with a candidate is added to the :class:`Reranker`'s score when the
text of the pair is a training caption.

Both directions of search (text→image and image→text) score the same
(text, image) pairing.

Per-image patch tokens are computed once, at index time, and kept in a
memory-mapped float16 file under ``HOME/rerank/`` keyed by content hash, so
re-ranking never decodes an image again and renamed or copied files share
their row. Candidate texts are short, so their token states are computed at
query time from the text tower.

This module imports torch at the top: it is only imported from command bodies.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from mmsearch.errors import HomeWriteError, RerankerUnavailableError
from mmsearch.exemplars import ExemplarMemory
from mmsearch.towers import (
    caption_log_likelihood, coca_text_states, image_token_states, is_coca, real_length, text_token_states,
)

if TYPE_CHECKING:
    from mmsearch.encode import Encoder
    from mmsearch.home import Home
    from mmsearch.modelspec import ModelSpec

#: (query rows, candidate rows) -> one value per pair: what ``eval`` and
#: ``train`` read scores and corrections from (``mmsearch.evaluate.Corrections``).
RowTable = Callable[[np.ndarray, np.ndarray], np.ndarray]

RERANKER_WEIGHTS = "reranker.safetensors"
RERANKER_CONFIG = "reranker.json"
DEFAULT_RERANK_K = 50
#: ``kind`` in reranker.json of a CoCa model's fitted fusion weights (no weights file).
CAPTION_KIND = "coca-caption"
#: The fusion weight of a CoCa model nobody fitted: the two models' log-probabilities added.
DEFAULT_CAPTION_WEIGHT = 1.0
DIRECTIONS = ("text_to_image", "image_to_text")

#: Held while a re-ranker is loaded, so threads that search at once load it once.
_LOADING = threading.Lock()


# -- the model -----------------------------------------------------------------


class CrossAttentionScorer(nn.Module):
    """Text tokens attend over image patch tokens; returns one correction per pair.

    Attention runs in the frozen encoder's shared space: each text token's
    cosine similarities to the patches, softmax-weighted with a learned
    temperature, give three read-outs per token (best patch, mean, attended);
    a small MLP and a masked mean over the text turn them into one number.
    There are deliberately no learned query/key projections: with them the
    module memorised the training captions and lowered Recall@1 on held-out
    ones (measured on the emoji set, see the README), while this form cannot
    learn caption identities and transfers to unseen texts.
    """

    def __init__(self, dim: int, hidden: int = 16):
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden}
        self.log_temperature = nn.Parameter(torch.tensor(float(np.log(10.0))))
        self.mlp = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.head = nn.Linear(hidden, 1)
        # the correction starts at exactly zero: untrained == dual encoder alone
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """text (B, L, dim), text_mask (B, L) bool, image (B, P, dim) -> (B,) corrections."""
        t = nn.functional.normalize(text.float(), dim=-1)
        p = nn.functional.normalize(image.float(), dim=-1)
        sim = t @ p.transpose(1, 2)  # (B, L, P)
        attention = (sim * self.log_temperature.exp()).softmax(dim=-1)
        features = torch.stack([sim.max(dim=-1).values, sim.mean(dim=-1), (attention * sim).sum(dim=-1)], dim=-1)
        h = self.mlp(features)
        m = text_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return self.head(pooled).squeeze(-1)


def save_scorer(scorer: CrossAttentionScorer, folder: Path, info: dict[str, Any] | None = None) -> None:
    """Write the re-ranker's weights (safetensors) and config next to a model."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in scorer.state_dict().items()}, folder / RERANKER_WEIGHTS)
    (folder / RERANKER_CONFIG).write_text(json.dumps({**scorer.config, **(info or {})}, indent=2))


def load_scorer(folder: Path, device: str = "cpu") -> CrossAttentionScorer:
    from safetensors.torch import load_file

    try:
        config = json.loads((folder / RERANKER_CONFIG).read_text())
        scorer = CrossAttentionScorer(int(config["dim"]), int(config["hidden"]))
        scorer.load_state_dict(load_file(folder / RERANKER_WEIGHTS))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RerankerUnavailableError(f"{folder}: cannot load the re-ranker ({first[:160]})") from None
    return scorer.to(device).eval()


def scorer_directions(folder: Path) -> tuple[str, ...]:
    """The directions a trained re-ranker re-scores (``directions`` in its config; both when absent)."""
    try:
        listed = json.loads((folder / RERANKER_CONFIG).read_text()).get("directions", DIRECTIONS)
    except (OSError, ValueError, AttributeError):
        listed = DIRECTIONS
    return tuple(d for d in DIRECTIONS if d in listed)


def reranker_folder(encoder: "Encoder") -> Path | None:
    """The model folder holding a trained cross-attention re-ranker, if the encoder's model has one."""
    path = encoder.spec.path
    if encoder.spec.kind == "local-dir" and path is not None and (path / RERANKER_WEIGHTS).is_file():
        return path
    return None


def spec_has_reranker(spec: "ModelSpec") -> bool:
    """Whether a model re-ranks, judged from its spec and files without loading it.

    A model folder with ``reranker.safetensors`` has a trained re-ranker; an
    open_clip CoCa (a ``coca_*`` architecture, or a folder whose config has a
    ``multimodal_cfg``) re-ranks with its own captioning decoder.
    """
    if spec.kind == "local-dir" and spec.path is not None:
        if (spec.path / RERANKER_WEIGHTS).is_file():
            return True
        try:
            config = json.loads((spec.path / "open_clip_config.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and "multimodal_cfg" in (config.get("model_cfg") or {})
    if spec.kind == "hf-hub":
        return "coca" in (spec.name or "").lower()
    return (spec.name or "").lower().startswith("coca")


def load_reranker(encoder: "Encoder") -> "Reranker | CaptionReranker":
    """The encoder's re-ranker, loaded once per encoder (a search process re-ranks many queries)."""
    with _LOADING:
        cached = getattr(encoder, "_reranker", None)
        if cached is None:
            if is_coca(encoder.model):
                cached = CaptionReranker(encoder, load_caption_weights(encoder))
            else:
                folder = reranker_folder(encoder)
                if folder is None:
                    raise RerankerUnavailableError(
                        f"model {encoder.spec} has no re-ranker ({RERANKER_WEIGHTS}); "
                        "train one with `mmsearch train PAIRS --out DIR` and use --model DIR"
                    )
                cached = Reranker(encoder, load_scorer(folder, encoder.device), scorer_directions(folder),
                                  ExemplarMemory.load(folder))
            object.__setattr__(encoder, "_reranker", cached)
    return cached


@dataclass
class TextStates:
    """A text query's token states (1, L, dim) and mask (1, L), computed once per search, and its text."""

    states: torch.Tensor
    mask: torch.Tensor
    text: str = ""


@dataclass
class Reranker:
    """A dual encoder plus its cross-attention correction.

    ``score(query, candidates)``: ``query`` is a text (str) or an image's patch
    tokens (array (P, dim)); each candidate is a dict with ``id``, ``score``
    (the dual-encoder score) and ``tokens`` (image candidates) or ``text``
    (text candidates). Returns dual score + correction per candidate; in a
    direction not in ``directions`` (``train`` found that the re-ranker
    lowered validation Recall@1 there) the dual score alone.

    With an exemplar memory (:mod:`mmsearch.exemplars`) weighted in the
    query's direction, its correction is added too: image candidates then
    need their normalised ``vector``, and an image query its own
    (``query_vector``).
    """

    encoder: "Encoder"
    scorer: CrossAttentionScorer
    directions: tuple[str, ...] = DIRECTIONS
    exemplars: ExemplarMemory | None = None

    @classmethod
    def load(cls, encoder: "Encoder") -> "Reranker | CaptionReranker":
        """The encoder's re-ranker (see :func:`load_reranker`): a CoCa model gets its decoder's."""
        return load_reranker(encoder)

    def text_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return text_token_states(self.encoder.text_model, self.encoder.tokenize(texts).to(self.encoder.device))

    def corrections(self, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self.scorer(text.to(self.encoder.device), mask.to(self.encoder.device), image.to(self.encoder.device))
        return out.float().cpu().numpy()

    def uses_exemplars(self, direction: str) -> bool:
        """Whether the exemplar memory re-scores ``direction`` (so candidates need their vectors)."""
        return self.exemplars is not None and self.exemplars.weights.get(direction, 0.0) > 0

    def score(
        self, query: "str | np.ndarray | TextStates", candidates: Sequence[dict[str, Any]],
        *, query_vector: np.ndarray | None = None,
    ) -> np.ndarray:
        if not candidates:
            return np.zeros(0, dtype=np.float32)
        dual = np.array([float(c["score"]) for c in candidates], dtype=np.float32)
        n = len(candidates)
        text_query = isinstance(query, (str, TextStates))
        direction = "text_to_image" if text_query else "image_to_text"
        total = dual
        if direction in self.directions:
            if text_query:
                states, mask = self.text_states([query]) if isinstance(query, str) else (query.states, query.mask)
                images = torch.from_numpy(np.stack([np.asarray(c["tokens"]) for c in candidates]))
                correction = self.corrections(states.expand(n, -1, -1), mask.expand(n, -1), images)
            else:
                states, mask = self.text_states([str(c["text"]) for c in candidates])
                image = torch.from_numpy(np.asarray(query))[None].expand(n, -1, -1)
                correction = self.corrections(states, mask, image)
            total = total + correction
        if self.uses_exemplars(direction):
            assert self.exemplars is not None
            if text_query:
                text = query if isinstance(query, str) else query.text
                if any("vector" not in c for c in candidates):
                    raise ValueError("this model's exemplar memory needs each image candidate's 'vector'")
                vectors = np.stack([np.asarray(c["vector"], dtype=np.float32) for c in candidates])
                total = total + self.exemplars.text_to_image(text, vectors)
            else:
                if query_vector is None:
                    raise ValueError("an image query re-ranked with exemplars needs its query_vector")
                total = total + self.exemplars.image_to_text(query_vector, [str(c["text"]) for c in candidates])
        return total

    def rank(
        self, query: "str | np.ndarray | TextStates", candidates: Sequence[dict[str, Any]], top_k: int | None = None,
        *, query_vector: np.ndarray | None = None,
    ) -> list[dict[str, Any]]:
        """Candidates best first, as ``[{"id", "score"}]`` (CrossEncoder style)."""
        scores = self.score(query, candidates, query_vector=query_vector)
        order = np.argsort(-scores, kind="stable")
        ranked = [{"id": candidates[i]["id"], "score": float(scores[i])} for i in order]
        return ranked if top_k is None else ranked[:top_k]


# -- a CoCa model's own decoder ---------------------------------------------------


def load_caption_weights(encoder: "Encoder") -> dict[str, float]:
    """The fusion weight per direction: fitted by ``train`` (reranker.json) or the default."""
    weights = {d: DEFAULT_CAPTION_WEIGHT for d in DIRECTIONS}
    path = encoder.spec.path
    config_path = path / RERANKER_CONFIG if encoder.spec.kind == "local-dir" and path is not None else None
    if config_path is None or not config_path.is_file():
        return weights
    try:
        config = json.loads(config_path.read_text())
        if config.get("kind") != CAPTION_KIND:
            raise ValueError(f"kind is {config.get('kind')!r}, not {CAPTION_KIND!r}")
        for d in DIRECTIONS:
            weights[d] = float(config[d])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise RerankerUnavailableError(f"{config_path}: cannot read the fusion weights ({str(exc)[:160]})") from None
    return weights


def save_caption_weights(folder: Path, weights: dict[str, float], info: dict[str, Any] | None = None) -> None:
    """Write a CoCa model's fitted fusion weights as its reranker.json (JSON only, no tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"kind": CAPTION_KIND, **{d: float(weights[d]) for d in DIRECTIONS}, **(info or {})}
    (folder / RERANKER_CONFIG).write_text(json.dumps(config, indent=2))


@dataclass
class CaptionReranker:
    """A CoCa model's text decoder as a re-ranker: dual score + weight × log p(text | image) / logit_scale.

    ``score(query, candidates)`` takes what :class:`Reranker` takes: a text
    query with image candidates carrying their decoder ``tokens`` (as stored
    at index time), or an image's decoder tokens (array (P, width)) with text
    candidates.
    """

    encoder: "Encoder"
    weights: dict[str, float]
    batch: int = 64

    @property
    def scale(self) -> float:
        return float(self.encoder.model.logit_scale.exp().item())

    def text_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder input states (N, L, width), tokens (N, L)) of texts, cut at their real length."""
        with torch.inference_mode():
            return coca_text_states(self.encoder.model, self.encoder.tokenize(texts).to(self.encoder.device))

    def log_likelihoods(self, states: torch.Tensor, tokens: torch.Tensor, image: torch.Tensor) -> np.ndarray:
        """log p(text | image) of aligned rows: states/tokens (B, L, ...) and image tokens (B, P, width)."""
        model, device = self.encoder.model, self.encoder.device
        out = []
        with torch.inference_mode():
            for s in range(0, len(tokens), self.batch):
                t = tokens[s:s + self.batch].to(device)
                length = real_length(t)
                x = states[s:s + self.batch, :length].to(device)
                out.append(caption_log_likelihood(model, image[s:s + self.batch].to(device), x, t[:, :length]))
        return torch.cat(out).float().cpu().numpy() if out else np.zeros(0, dtype=np.float32)

    def uses_exemplars(self, direction: str) -> bool:
        """A CoCa model's decoder re-ranks alone (no exemplar memory)."""
        return False

    def score(
        self, query: "str | np.ndarray", candidates: Sequence[dict[str, Any]], *, query_vector: np.ndarray | None = None,
    ) -> np.ndarray:
        """Dual score + the decoder's correction per candidate (``query_vector`` is not needed)."""
        if not candidates:
            return np.zeros(0, dtype=np.float32)
        dual = np.array([float(c["score"]) for c in candidates], dtype=np.float32)
        n = len(candidates)
        if isinstance(query, str):
            weight = self.weights["text_to_image"]
            states, tokens = self.text_states([query])
            images = torch.from_numpy(np.stack([np.asarray(c["tokens"]) for c in candidates]))
            loglik = self.log_likelihoods(states.expand(n, -1, -1), tokens.expand(n, -1), images)
        else:
            weight = self.weights["image_to_text"]
            states, tokens = self.text_states([str(c["text"]) for c in candidates])
            image = torch.from_numpy(np.asarray(query))[None].expand(n, -1, -1)
            loglik = self.log_likelihoods(states, tokens, image)
        if weight == 0.0:
            return dual  # exactly the dual-encoder scores
        return (dual + weight * loglik / self.scale).astype(np.float32)

    def rank(self, query: "str | np.ndarray", candidates: Sequence[dict[str, Any]], top_k: int | None = None) -> list[dict[str, Any]]:
        """Candidates best first, as ``[{"id", "score"}]`` (CrossEncoder style)."""
        scores = self.score(query, candidates)
        order = np.argsort(-scores, kind="stable")
        ranked = [{"id": candidates[i]["id"], "score": float(scores[i])} for i in order]
        return ranked if top_k is None else ranked[:top_k]

    def log_likelihood_table(
        self, texts: Sequence[str], image_tokens: torch.Tensor, text_queries: bool, batch: int = 256
    ) -> RowTable:
        """A function (query rows, candidate rows) -> log-likelihoods, over many texts and images.

        Used by ``eval`` and ``train``: the texts' states are computed once;
        ``text_queries`` says whether query rows index ``texts`` (else
        ``image_tokens``). Returns raw log-likelihoods, not weighted.
        """
        parts = [self.text_states(list(texts[s:s + batch])) for s in range(0, len(texts), batch)]
        length = max(t.shape[1] for _, t in parts)
        states = torch.cat([torch.nn.functional.pad(x, (0, 0, 0, length - x.shape[1])) for x, _ in parts])
        tokens = torch.cat([torch.nn.functional.pad(t, (0, length - t.shape[1])) for _, t in parts])
        # rows are gathered pair by pair; sort them by length so each batch is cut short
        lengths = (tokens != 0).sum(dim=1).numpy()

        def run(rows: np.ndarray, cands: np.ndarray) -> np.ndarray:
            q = np.repeat(rows, cands.shape[1])
            c = cands.reshape(-1)
            t_idx, i_idx = (q, c) if text_queries else (c, q)
            order = np.argsort(lengths[t_idx], kind="stable")
            t_sorted, i_sorted = torch.from_numpy(t_idx[order]), torch.from_numpy(i_idx[order])
            values = self.log_likelihoods(states[t_sorted], tokens[t_sorted], image_tokens[i_sorted])
            out = np.empty(len(order), dtype=np.float32)
            out[order] = values
            return out.reshape(cands.shape)

        return run

    def corrections(self, loglik: RowTable, direction: str) -> RowTable:
        """The fused corrections (weight × log-likelihood / logit_scale) over a :meth:`log_likelihood_table`."""
        weight, scale = self.weights[direction], self.scale

        def run(rows: np.ndarray, cands: np.ndarray) -> np.ndarray:
            if weight == 0.0:
                return np.zeros(cands.shape, dtype=np.float32)
            return weight * loglik(rows, cands) / scale

        return run


# -- index-time token storage ----------------------------------------------------


class TokenStore:
    """Patch tokens per image content hash: one float16 row each in a memory-mapped file.

    Append-only: the row's bytes are written before its hash is listed, so an
    interrupted write leaves at most an unlisted tail that is overwritten later.
    """

    def __init__(self, folder: Path, tokens: int, dim: int):
        self.folder = folder
        self.tokens = tokens
        self.dim = dim
        self.data_path = folder / "tokens.f16"
        self.hash_path = folder / "tokens.hashes"
        hashes = self.hash_path.read_text().split() if self.hash_path.exists() else []
        size = self.data_path.stat().st_size if self.data_path.exists() else 0
        hashes = hashes[: size // self.row_bytes]
        self.rows: dict[str, int] = {h: i for i, h in enumerate(hashes)}
        self._count = len(hashes)
        self._map: np.memmap | None = None

    @property
    def row_bytes(self) -> int:
        return self.tokens * self.dim * 2

    @classmethod
    def open(cls, home_dir: Path, model: str, shape: tuple[int, int] | None = None) -> "TokenStore | None":
        """The home's store; ``shape`` (tokens, dim) creates or resets it for ``model``."""
        folder = home_dir / "rerank"
        meta_path = folder / "tokens.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else None
        if meta is not None and meta.get("model") == model and (shape is None or tuple(shape) == (meta["tokens"], meta["dim"])):
            return cls(folder, int(meta["tokens"]), int(meta["dim"]))
        if shape is None:
            return None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for path in (folder / "tokens.f16", folder / "tokens.hashes"):
                path.unlink(missing_ok=True)
            meta_path.write_text(json.dumps({"model": model, "tokens": shape[0], "dim": shape[1], "dtype": "float16"}))
        except OSError as exc:
            meta_path.unlink(missing_ok=True)  # a half-written header would not parse next time
            raise _cannot_write(meta_path, exc) from None
        return cls(folder, shape[0], shape[1])

    def add(self, hashes: Sequence[str], tokens: np.ndarray) -> None:
        """Store the tokens (N, tokens, dim) of new content hashes; known ones are kept."""
        new = [(h, i) for i, h in enumerate(hashes) if h not in self.rows]
        seen: set[str] = set()
        new = [(h, i) for h, i in new if not (h in seen or seen.add(h))]
        if not new:
            return
        block = np.ascontiguousarray(tokens[[i for _, i in new]], dtype="<f2")
        path = self.data_path
        try:
            with open(self.data_path, "r+b" if self.data_path.exists() else "wb") as f:
                f.seek(self._count * self.row_bytes)
                f.write(block.tobytes())
                f.flush()
                os.fsync(f.fileno())
            path = self.hash_path
            listed = self.hash_path.stat().st_size if self.hash_path.exists() else 0
            try:
                with open(self.hash_path, "a") as f:
                    f.write("".join(h + "\n" for h, _ in new))
            except OSError:
                os.truncate(self.hash_path, listed)  # a partly listed batch would shift every later row
                raise
        except OSError as exc:
            raise _cannot_write(path, exc) from None
        for h, _ in new:
            self.rows[h] = self._count
            self._count += 1
        self._map = None

    def get(self, hashes: Sequence[str]) -> list[np.ndarray | None]:
        """The stored tokens of each hash (float16 (tokens, dim)), None where missing."""
        if self._map is None and self._count:
            self._map = np.memmap(self.data_path, dtype="<f2", mode="r", shape=(self._count, self.tokens, self.dim))
        out: list[np.ndarray | None] = []
        for h in hashes:
            row = self.rows.get(h)
            out.append(None if row is None or self._map is None else np.asarray(self._map[row]))
        return out


def _cannot_write(path: Path, exc: OSError) -> HomeWriteError:
    """A store write that failed (a full disk): the batch is not listed, what was stored is kept."""
    return HomeWriteError(
        f"cannot write {path}: {exc.strerror or exc}; what was indexed before is kept, "
        "and the next `mmsearch index` goes on from there"
    )


def token_sink(home: "Home", encoder: "Encoder", folder: Path | None = None) -> TokenStore | None:
    """The store the indexer fills, or None when the model has no re-ranker.

    ``folder`` holds the store's ``rerank/`` instead of the home (``reindex``
    fills one for the new model beside the one in use).

    Tokens cost tokens×dim×2 bytes per image (4 KiB for the shipped small
    model, 255 KiB for a CoCa ViT-B-32's decoder tokens) against 0.5–2 KiB
    for a vector, so they are kept only where a re-ranker can use them.
    """
    if reranker_folder(encoder) is None and not is_coca(encoder.model):
        return None
    size = encoder.image_size
    with torch.inference_mode():
        probe = torch.zeros(1, 3, size, size, device=encoder.device)
        _, tokens = image_token_states(encoder.model, probe)
    shape = (int(tokens.shape[1]), int(tokens.shape[2]))
    return TokenStore.open(folder or home.settings.home, encoder.spec.canonical, shape)
