"""The split preprocessing gives the very tensors the model's own transform gives."""

from __future__ import annotations

import torch
from PIL import Image

from mmsearch.encode import load_encoder
from mmsearch.preprocess import split_preprocess


def test_split_matches_whole_transform(tiny_model):
    encoder = load_encoder(f"local-dir:{tiny_model}", "cpu")
    split = split_preprocess(encoder.preprocess)
    images = [
        Image.new("RGB", (90, 60), (200, 30, 40)),
        Image.linear_gradient("L").resize((50, 80)),  # greyscale, portrait
        Image.new("RGBA", (40, 40), (0, 0, 255, 128)).convert("RGB"),
    ]
    whole = torch.stack([encoder.preprocess(img) for img in images])
    batched = split.batch([split.per_image(img) for img in images])
    assert batched.shape == whole.shape
    assert torch.allclose(batched, whole, atol=1e-6)


def test_unknown_transform_runs_whole():
    split = split_preprocess(lambda img: torch.zeros(3, 2, 2))
    out = split.batch([split.per_image(None), split.per_image(None)])
    assert out.shape == (2, 3, 2, 2)
