"""open_clip's towers from the inside: token states, truncated text passes, unfilled builds.

Everything here reaches past open_clip's public API (a tower's forward pieces,
its attention mask, its pooling), so it lives in this one leaf module that
:mod:`mmsearch.encode`, :mod:`mmsearch.rerank`, :mod:`mmsearch.evaluate` and
:mod:`mmsearch.train` import. Nothing here changes a model, a module of torch
or any other state that another thread could see: a model shared by indexing
lanes or by a server's request threads can be used from all of them at once.

This module imports torch at the top: it is only imported from code that runs
a model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mmsearch.errors import RerankerUnavailableError

# -- the image tower -----------------------------------------------------------------


def image_token_states(model: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled embedding before normalisation, patch tokens projected to the shared space).

    Runs the vision tower's own forward pieces rather than its ``forward``, whose
    output depends on the tower's ``output_tokens`` flag: flipping that flag for
    one call raced with every other thread using the same model.
    """
    visual = model.visual
    pieces = ("_embeds", "_pool", "transformer")
    if not all(hasattr(visual, name) for name in pieces) or getattr(visual, "attn_pool", None) is not None:
        raise RerankerUnavailableError("re-ranking needs a plain ViT image tower (open_clip VisionTransformer)")
    x = visual._embeds(pixels)
    x = visual.transformer(x)
    pooled, tokens = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
        tokens = tokens @ visual.proj
    return pooled, tokens


# -- the text tower ------------------------------------------------------------------


def text_tower(model: Any) -> Any:
    """The module holding token_embedding/positional_embedding/transformer."""
    return model if hasattr(model, "token_embedding") else getattr(model, "text", None)


def supports_truncation(model: Any) -> bool:
    """Whether the text tower is causal and pooled at the end-of-text token (CLIP style)."""
    tower = text_tower(model)
    if tower is None or not hasattr(tower, "token_embedding"):
        return False
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
    return (
        pool == "argmax"
        and getattr(tower, "attn_mask", None) is not None
        and getattr(tower, "cls_emb", None) is None
    )


def real_length(tokens: torch.Tensor) -> int:
    """Token count up to and including the last end-of-text token in the batch."""
    return int(tokens.argmax(dim=-1).max().item()) + 1


def text_states_after_ln(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token states after ``ln_final`` of a batch cut at its real length, and the cut tokens."""
    tower = text_tower(model)
    length = real_length(tokens)
    tokens = tokens[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    return tower.ln_final(x), tokens


def _project(tower: Any, x: torch.Tensor) -> torch.Tensor:
    projection = tower.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def encode_text_tokens(model: Any, tokens: torch.Tensor, *, truncate: bool = True) -> torch.Tensor:
    """Unnormalised text features of a token batch; at its real length when the tower allows.

    A causal text tower pooled at the end-of-text token gives the same vector
    for any length that holds every real token, so cutting the padding only
    saves work. The one place that decides between the truncated and the
    padded pass, for search and for training alike.
    """
    if not (truncate and supports_truncation(model)):
        return model.encode_text(tokens)
    from open_clip.transformer import text_global_pool

    x, tokens = text_states_after_ln(model, tokens)
    return _project(text_tower(model), text_global_pool(x, tokens, "argmax"))


class _TextSide(nn.Module):
    """A copy of a CLIP-style text tower's pieces, for :func:`encode_text_tokens` (see :func:`bfloat16_text_side`)."""

    def __init__(self, tower: Any):
        super().__init__()
        self.token_embedding = copy.deepcopy(tower.token_embedding)
        self.positional_embedding = nn.Parameter(tower.positional_embedding.detach().clone(), requires_grad=False)
        self.transformer = copy.deepcopy(tower.transformer)
        self.ln_final = copy.deepcopy(tower.ln_final)
        projection = tower.text_projection
        if isinstance(projection, nn.Module):
            projection = copy.deepcopy(projection)
        elif projection is not None:
            projection = nn.Parameter(projection.detach().clone(), requires_grad=False)
        self.text_projection = projection
        self.register_buffer("attn_mask", tower.attn_mask.detach().clone(), persistent=False)
        self.text_pool_type = "argmax"
        self.cls_emb = None


def bfloat16_text_side(model: Any) -> nn.Module | None:
    """A bfloat16 copy of the model's text tower that :func:`encode_text_tokens` runs; ``None`` if not CLIP-style.

    On a CPU with native bfloat16 matrix units a text pass reads half the
    weight bytes and runs on those units. The model itself is left as it is
    (the re-ranker and the padded pass keep using it in float32).
    """
    if not supports_truncation(model):
        return None
    side = _TextSide(text_tower(model)).to(torch.bfloat16).eval()
    side.requires_grad_(False)
    return side


def native_bfloat16(device: str) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices natively (a CPU with AMX or AVX-512 BF16)."""
    if device != "cpu":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def text_token_states(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token text states projected to the shared space (float32), and the mask of real tokens.

    The batch runs at its real length (up to the last end-of-text token).
    """
    if not supports_truncation(model):
        raise RerankerUnavailableError("re-ranking needs a CLIP-style causal text tower")
    x, tokens = text_states_after_ln(model, tokens)
    x = _project(text_tower(model), x).float()
    positions = torch.arange(tokens.shape[1], device=tokens.device)
    mask = positions[None, :] <= tokens.argmax(dim=-1)[:, None]
    return x, mask


# -- building a model whose weights are loaded next -------------------------------------

#: The random fills that building a model spends its time on, at the two levels
#: they are reached: ``torch.nn.init``'s functions and the tensor methods under them.
_RANDOM_FILLS = frozenset({
    nn.init.uniform_, nn.init.normal_, nn.init.kaiming_uniform_,
    torch.Tensor.uniform_, torch.Tensor.normal_,
})


class _SkipRandomFills(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in _RANDOM_FILLS:
            return args[0] if args else (kwargs or {}).get("tensor")
        return func(*args, **(kwargs or {}))


@contextmanager
def unfilled_parameters() -> Iterator[None]:
    """Leave new parameters unfilled while building a model whose weights are all loaded next.

    Filling ViT-B-32's ~150M parameters with random numbers that the
    checkpoint then overwrites was most of its load time. A torch function
    mode is per thread, so a model built at the same time in another thread
    (training from scratch, say) is initialised as usual, and torch itself is
    left as it was. Only for a model loaded with a strict, complete load.
    """
    with _SkipRandomFills():
        yield
