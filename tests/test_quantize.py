"""The opt-in int8 image tower: same attention maths, close embeddings, clear refusals."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.encode import load_encoder
from mmsearch.errors import UsageError
from mmsearch.quantize import SelfAttention, linear_attention, quantize_image_tower
from mmsearch.settings import resolve


def test_linear_self_attention_computes_what_multihead_attention_does(tiny_model):
    model = load_encoder(f"local-dir:{tiny_model}", "cpu").model
    visual = copy.deepcopy(model.visual)
    assert linear_attention(visual) == len(visual.transformer.resblocks) > 0
    assert all(isinstance(b.attn, SelfAttention) for b in visual.transformer.resblocks)
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(visual(x), model.visual(x), atol=1e-5, rtol=1e-4)


def test_int8_encoder_quantises_every_image_linear_and_stays_close(tiny_model, photo_dir):
    fp32 = load_encoder(f"local-dir:{tiny_model}", "cpu")
    int8 = load_encoder(f"local-dir:{tiny_model}", "cpu", int8=True)
    quantized = [m for m in int8.model.visual.modules() if type(m).__module__.startswith("torch.ao.nn.quantized")]
    plain = [m for m in int8.model.visual.modules() if type(m) is torch.nn.Linear]
    assert quantized and not plain  # attention projections included
    pixels = torch.stack([fp32.preprocess(image) for image in _images(photo_dir)])
    a, b = fp32.embed_images(pixels), int8.embed_images(pixels)
    assert b.dtype == np.float32 and np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert float(np.min(np.sum(a * b, axis=1))) > 0.99
    np.testing.assert_array_equal(fp32.embed_texts(["red car"]), int8.embed_texts(["red car"]))  # texts stay float32


def _images(folder):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted(folder.rglob("*.jpg"))[:3]]


def test_int8_is_cpu_only_and_settings_read_the_environment(tiny_model, monkeypatch):
    model = load_encoder(f"local-dir:{tiny_model}", "cpu").model
    with pytest.raises(UsageError, match="CPU only"):
        quantize_image_tower(model, "cuda")
    monkeypatch.setenv("MMSEARCH_INT8", "1")
    assert resolve().int8 is True
    monkeypatch.setenv("MMSEARCH_INT8", "maybe")
    with pytest.raises(UsageError, match="MMSEARCH_INT8"):
        resolve()


def test_index_and_search_with_int8(tiny_model, photo_dir, home):
    base = ["--home", str(home), "--model", str(tiny_model), "--device", "cpu", "--int8"]
    out = CliRunner().invoke(app, [*base, "index", str(photo_dir), "--json", "--quiet"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.strip().splitlines()[-1])["added"] >= 5
    query = ["search", "--image", str(photo_dir / "red.jpg"), "-k", "1", "--json"]
    found = CliRunner().invoke(app, [*base, *query], catch_exceptions=False)
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout.strip().splitlines()[0])["path"] == str(photo_dir / "red.jpg")


def test_train_refuses_int8(tmp_path):
    out = CliRunner().invoke(app, ["--int8", "train", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "m")])
    assert out.exit_code != 0 and "--int8" in out.output and "Traceback" not in out.output
