"""Split an image transform into a per-image PIL part and a batched tensor part.

open_clip's transform is ``Resize, CenterCrop, ConvertMode, ToTensor,
Normalize``. Run per image in decode threads, the two tensor steps start a
torch (OpenMP) thread team in every decode thread, which on a small machine
fights the model's own threads: on 2 cores a 224-pixel ToTensor+Normalize took
~50 ms that way against ~5 ms single-threaded. So decode threads stop at
uint8 pixels (pure Pillow, which releases the GIL), and the model's thread
turns a whole batch into a normalised tensor in one step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

_TO_TENSOR = ("ToTensor", "MaybeToTensor")


@dataclass(frozen=True)
class SplitPreprocess:
    """``per_image(PIL image) -> pixels``; ``batch([pixels, ...]) -> (N, 3, H, W) float tensor``."""

    per_image: Callable[[Any], Any]
    batch: Callable[[Sequence[Any]], Any]


def split_preprocess(preprocess: Callable[[Any], Any]) -> SplitPreprocess:
    """Split ``preprocess`` if it is a torchvision ``Compose`` of PIL steps, ToTensor, then
    tensor-only steps (Normalize); otherwise run it whole per image and just stack."""
    import torch

    steps = list(getattr(preprocess, "transforms", []) or [])
    names = [type(s).__name__ for s in steps]
    cut = next((i for i, n in enumerate(names) if n in _TO_TENSOR), None)
    if cut is None or any(n != "Normalize" for n in names[cut + 1:]):
        return SplitPreprocess(preprocess, lambda items: torch.stack(list(items)))
    pil_steps, tensor_steps = steps[:cut], steps[cut + 1:]

    def per_image(img: Any) -> np.ndarray:
        for step in pil_steps:
            img = step(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        return np.asarray(img)  # (H, W, 3) uint8

    def batch(items: Sequence[np.ndarray]) -> "torch.Tensor":
        x = torch.from_numpy(np.stack(items)).permute(0, 3, 1, 2).float().div_(255.0)
        for step in tensor_steps:
            x = step(x)
        return x.contiguous()

    return SplitPreprocess(per_image, batch)
