"""Rerank stage: a cross-attention model re-scores the dual encoder's best candidates.

The text's token states attend over the image's patch tokens; the attended
features are read out as one number, a *correction* added to the dual-encoder
cosine score. The read-out's last layer starts at zero, so an untrained
re-ranker returns exactly the dual-encoder ranking. Both directions of search
(text→image and image→text) score the same (text, image) pairing.

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
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from mmsearch.errors import HomeWriteError, RerankerUnavailableError
from mmsearch.towers import image_token_states, text_token_states

if TYPE_CHECKING:
    from mmsearch.encode import Encoder
    from mmsearch.home import Home

RERANKER_WEIGHTS = "reranker.safetensors"
RERANKER_CONFIG = "reranker.json"
DEFAULT_RERANK_K = 50

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


def reranker_folder(encoder: "Encoder") -> Path | None:
    """The model folder holding a re-ranker, if the encoder's model has one."""
    path = encoder.spec.path
    if encoder.spec.kind == "local-dir" and path is not None and (path / RERANKER_WEIGHTS).is_file():
        return path
    return None


@dataclass
class TextStates:
    """A text query's token states (1, L, dim) and mask (1, L), computed once per search."""

    states: torch.Tensor
    mask: torch.Tensor


@dataclass
class Reranker:
    """A dual encoder plus its cross-attention correction.

    ``score(query, candidates)``: ``query`` is a text (str) or an image's patch
    tokens (array (P, dim)); each candidate is a dict with ``id``, ``score``
    (the dual-encoder score) and ``tokens`` (image candidates) or ``text``
    (text candidates). Returns dual score + correction per candidate.
    """

    encoder: "Encoder"
    scorer: CrossAttentionScorer

    @classmethod
    def load(cls, encoder: "Encoder") -> "Reranker":
        folder = reranker_folder(encoder)
        if folder is None:
            raise RerankerUnavailableError(
                f"model {encoder.spec} has no re-ranker ({RERANKER_WEIGHTS}); "
                "train one with `mmsearch train PAIRS --out DIR` and use --model DIR"
            )
        with _LOADING:  # loaded once per encoder: a search process re-ranks many queries
            cached = getattr(encoder, "_reranker", None)
            if cached is None:
                cached = cls(encoder, load_scorer(folder, encoder.device))
                object.__setattr__(encoder, "_reranker", cached)
        return cached

    def text_states(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            return text_token_states(self.encoder.text_model, self.encoder.tokenize(texts).to(self.encoder.device))

    def corrections(self, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            out = self.scorer(text.to(self.encoder.device), mask.to(self.encoder.device), image.to(self.encoder.device))
        return out.float().cpu().numpy()

    def score(self, query: "str | np.ndarray | TextStates", candidates: Sequence[dict[str, Any]]) -> np.ndarray:
        if not candidates:
            return np.zeros(0, dtype=np.float32)
        dual = np.array([float(c["score"]) for c in candidates], dtype=np.float32)
        n = len(candidates)
        if isinstance(query, (str, TextStates)):
            states, mask = self.text_states([query]) if isinstance(query, str) else (query.states, query.mask)
            images = torch.from_numpy(np.stack([np.asarray(c["tokens"]) for c in candidates]))
            correction = self.corrections(states.expand(n, -1, -1), mask.expand(n, -1), images)
        else:
            states, mask = self.text_states([str(c["text"]) for c in candidates])
            image = torch.from_numpy(np.asarray(query))[None].expand(n, -1, -1)
            correction = self.corrections(states, mask, image)
        return dual + correction

    def rank(self, query: "str | np.ndarray | TextStates", candidates: Sequence[dict[str, Any]], top_k: int | None = None) -> list[dict[str, Any]]:
        """Candidates best first, as ``[{"id", "score"}]`` (CrossEncoder style)."""
        scores = self.score(query, candidates)
        order = np.argsort(-scores, kind="stable")
        ranked = [{"id": candidates[i]["id"], "score": float(scores[i])} for i in order]
        return ranked if top_k is None else ranked[:top_k]


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


def token_sink(home: "Home", encoder: "Encoder") -> TokenStore | None:
    """The store the indexer fills, or None when the model has no re-ranker.

    Tokens cost tokens×dim×2 bytes per image (9 KiB for the shipped small
    model, 49 KiB for ViT-B-32) against 0.5–2 KiB for a vector, so they are
    kept only where a re-ranker can use them.
    """
    if reranker_folder(encoder) is None:
        return None
    size = encoder.image_size
    with torch.inference_mode():
        probe = torch.zeros(1, 3, size, size, device=encoder.device)
        _, tokens = image_token_states(encoder.model, probe)
    return TokenStore.open(home.settings.home, encoder.spec.canonical, (int(tokens.shape[1]), int(tokens.shape[2])))
