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


def is_coca(model: Any) -> bool:
    """Whether the model is an open_clip CoCa: a dual encoder plus a captioning text decoder."""
    return hasattr(model, "text_decoder") and hasattr(model, "text") and hasattr(model.visual, "attn_pool")


def image_token_states(model: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled embedding before normalisation, patch tokens projected to the shared space).

    Runs the vision tower's own forward pieces rather than its ``forward``, whose
    output depends on the tower's ``output_tokens`` flag: flipping that flag for
    one call raced with every other thread using the same model.

    For a CoCa model the tokens are what its text decoder cross-attends over:
    the attentional pooler's outputs after ``ln_post``, unprojected, exactly
    as :class:`open_clip.CoCa` hands them to its decoder.
    """
    visual = model.visual
    if is_modified_resnet(visual):
        return _resnet_token_states(visual, pixels)
    pieces = ("_embeds", "_pool", "transformer")
    coca = is_coca(model)
    if not all(hasattr(visual, name) for name in pieces) or (getattr(visual, "attn_pool", None) is not None and not coca):
        raise RerankerUnavailableError(
            "re-ranking needs a plain ViT or ResNet image tower (open_clip VisionTransformer, ModifiedResNet) "
            "or a CoCa model")
    x = visual._embeds(pixels)
    x = visual.transformer(x)
    pooled, tokens = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
        if not coca:
            tokens = tokens @ visual.proj
    return pooled, tokens


def is_modified_resnet(visual: Any) -> bool:
    """Whether an image tower is open_clip's ModifiedResNet (RN50... and ``mmsearch-small``)."""
    return all(hasattr(visual, name) for name in ("stem", "layer4", "attnpool"))


def _resnet_token_states(visual: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ModifiedResNet's pooled embedding and one token per cell of its last feature map.

    A cell's token is its value in the attention pool, projected as the pool
    projects its output (``c_proj(v_proj(cell + position))``): the pooled
    embedding is, head by head, an attention-weighted mix of these (up to the
    bias), so they live in the shared space as a ViT's projected patches do.
    """
    x = visual.stem(pixels)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    pooled = pool(x)
    cells = x.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(x.dtype)
    return pooled, pool.c_proj(pool.v_proj(cells))


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


# -- CoCa's captioning decoder --------------------------------------------------------


def coca_text_states(model: Any, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token states of the unimodal text tower, the tokens cut at their real length).

    The states are what :class:`open_clip.CoCa` feeds its decoder (before
    ``ln_final``, the appended class token dropped). The tower is causal, so
    cutting the padding changes no real token's state.
    """
    tokens = tokens[:, :real_length(tokens)]
    tower = model.text
    x, attn_mask = tower._embeds(tokens)
    x = tower.transformer(x, attn_mask=attn_mask)
    return x[:, :-1], tokens


def caption_log_likelihood(
    model: Any, image_tokens: torch.Tensor, text_states: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """log p(text | image) under CoCa's decoder, summed over the text's tokens: (B,).

    ``image_tokens`` (B, P, width) are the image's decoder tokens
    (:func:`image_token_states`), ``text_states`` and ``tokens`` come from
    :func:`coca_text_states`. Each position predicts the next token (teacher
    forcing, as in CoCa's captioning loss); the end-of-text token counts,
    padding does not.
    """
    logits = model.text_decoder(image_tokens.to(text_states.dtype), text_states[:, :-1])
    labels = tokens[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    pad_id = int(getattr(model, "pad_id", 0))
    return (logp * (labels != pad_id)).sum(dim=-1)


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
