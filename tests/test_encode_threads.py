"""A short text query runs single-threaded on the CPU, and the thread count is restored."""

from __future__ import annotations

import numpy as np
import torch

from mmsearch.encode import load_encoder


def test_small_text_batch_restores_threads_and_matches(tiny_model):
    encoder = load_encoder(f"local-dir:{tiny_model}", "cpu")
    before = torch.get_num_threads()
    one = encoder.embed_texts(["red car"])
    assert torch.get_num_threads() == before
    many = encoder.embed_texts(["red car"] + [f"text {i}" for i in range(20)])
    assert np.allclose(one[0], many[0], atol=1e-5)
