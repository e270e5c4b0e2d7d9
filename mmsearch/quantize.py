"""Opt-in int8 inference for the image tower (``--int8``): faster indexing on a CPU.

torch's dynamic quantisation stores each ``nn.Linear`` weight as int8 and
quantises activations on the fly (fbgemm kernels). open_clip's default block
keeps attention's input projection as a bare parameter of
``nn.MultiheadAttention``, which quantisation skips, so the image tower's
self-attention is first rebuilt around ``nn.Linear`` layers (same weights,
same result to float rounding). On ViT-B-32 with 2 CPU threads that made
int8 ~1.5× the float32 rate, against ~1.25× with the MLPs alone
(bench/int8.py). Texts stay float32: a query is latency-bound and short.

Off by default: the embeddings move (cosine ~0.9997 to float32 on random
weights) and retrieval quality has not been shown equal on pretrained weights
here. This module imports torch at the top: it is only imported when asked for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmsearch.errors import UsageError


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch-first self-attention) with its projections as ``nn.Linear``."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        dim = mha.embed_dim
        self.heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.in_proj = nn.Linear(dim, 3 * dim, bias=mha.in_proj_bias is not None)
        self.in_proj.weight = mha.in_proj_weight
        if mha.in_proj_bias is not None:
            self.in_proj.bias = mha.in_proj_bias
        self.out_proj = nn.Linear(dim, dim, bias=mha.out_proj.bias is not None)
        self.out_proj.weight = mha.out_proj.weight
        if mha.out_proj.bias is not None:
            self.out_proj.bias = mha.out_proj.bias

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        need_weights: bool = False, attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None]:
        if key is not query or value is not query:
            raise ValueError("SelfAttention only does self-attention")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, length, dim = x.shape
        qkv = self.in_proj(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=attn_mask)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def linear_attention(tower: nn.Module) -> int:
    """Swap every plain self-attention ``nn.MultiheadAttention`` in ``tower`` for :class:`SelfAttention`.

    Returns how many were swapped. Attention with separate key/value
    projections (cross-attention, attentional pooling) is left alone.
    """
    swapped = 0
    for module in list(tower.modules()):
        attn = getattr(module, "attn", None)
        if isinstance(attn, nn.MultiheadAttention) and attn.in_proj_weight is not None and not hasattr(module, "ln_1_kv"):
            module.attn = SelfAttention(attn)
            swapped += 1
    return swapped


def quantize_image_tower(model: Any, device: str) -> None:
    """Make ``model.visual`` run int8 dynamic quantisation in place (CPU only)."""
    if device != "cpu":
        raise UsageError(f"--int8 runs on the CPU only (device is {device}); drop --int8 or use --device cpu")
    quantize = getattr(getattr(torch, "ao", None), "quantization", None)
    if quantize is None or not hasattr(quantize, "quantize_dynamic"):
        raise UsageError(f"--int8 needs torch's dynamic quantisation, which torch {torch.__version__} no longer has")
    linear_attention(model.visual)
    # torch.ao.quantization announces its deprecation on every call; front ends
    # silence that once (mmsearch.runtime.quiet_library_warnings)
    model.visual = quantize.quantize_dynamic(model.visual, {nn.Linear}, dtype=torch.qint8)
