"""One model, many threads: no call changes state that another thread shares.

Indexing lanes and a server's request threads use one loaded model at once.
A call that flipped an attribute of the model, a torch setting or a module
function for its own duration raced with every other thread (issue: indexing
with a re-ranker crashed with ``too many values to unpack`` in a lane).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.encode import load_encoder
from mmsearch.towers import image_token_states, unfilled_parameters


def noise_images(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` distinct small PNGs (random pixels: every content hash differs)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(24, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return folder


def test_indexing_in_lanes_with_a_reranker_indexes_every_image(untrained_rerank_model: Path, tmp_path: Path) -> None:
    """Two lanes share the model and both read its patch tokens: every run completes, every image is in."""
    photos = noise_images(tmp_path / "photos", 300)
    for run in range(3):
        home = tmp_path / f"home{run}"
        result = CliRunner().invoke(
            app,
            ["--home", str(home), "--model", str(untrained_rerank_model), "--workers", "2", "--batch-size", "4",
             "index", str(photos), "--json", "--quiet"],
        )
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["added"] == 300 and report["skipped"] == 0
        hashes = (home / "rerank" / "tokens.hashes").read_text().split()
        assert len(set(hashes)) == 300


def test_image_token_states_leave_the_tower_as_it_was(tiny_model: Path) -> None:
    encoder = load_encoder(f"local-dir:{tiny_model}", "cpu")
    visual = encoder.model.visual
    pixels = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        pooled, tokens = image_token_states(encoder.model, pixels)
        assert visual.output_tokens is False
        assert torch.allclose(pooled, visual(pixels), atol=1e-6)  # the tower's own pooled output
        visual.output_tokens = True
        try:
            _, raw_tokens = visual(pixels)
        finally:
            visual.output_tokens = False
    assert torch.allclose(tokens, raw_tokens @ visual.proj, atol=1e-6)
    assert tokens.shape == (3, 16, 32)


def test_the_towers_forward_stays_plain_while_other_threads_read_tokens(tiny_model: Path) -> None:
    """While threads take token states, the tower's forward keeps returning one tensor."""
    encoder = load_encoder(f"local-dir:{tiny_model}", "cpu")
    pixels = torch.randn(2, 3, 32, 32)
    errors: list[BaseException] = []
    stop = threading.Event()

    def tokens_forever() -> None:
        with torch.inference_mode():
            while not stop.is_set():
                image_token_states(encoder.model, pixels)

    readers = [threading.Thread(target=tokens_forever) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        with torch.inference_mode():
            for _ in range(200):
                out = encoder.model.visual(pixels)
                if not isinstance(out, torch.Tensor):
                    errors.append(TypeError(f"forward returned {type(out).__name__}"))
                    break
    finally:
        stop.set()
        for reader in readers:
            reader.join()
    assert not errors


def test_library_calls_leave_process_state_alone(untrained_rerank_model: Path, tmp_path: Path) -> None:
    """Loading, embedding and indexing change no thread count, logging switch, torch function or env."""
    from huggingface_hub import constants

    from mmsearch.home import Home
    from mmsearch.indexer import index_paths
    from mmsearch.settings import resolve

    photos = noise_images(tmp_path / "photos", 12)
    before = (
        torch.get_num_threads(), logging.root.manager.disable, torch.nn.init.uniform_,
        torch.nn.init.normal_, constants.HF_HUB_OFFLINE, dict(os.environ),
    )
    settings = resolve(home=tmp_path / "home", model=str(untrained_rerank_model), workers=2, batch_size=4)
    with Home.open(settings) as home:
        report = index_paths(home, [photos], progress=False)
        encoder = home.encoder()
        encoder.embed_texts(["red"])
        encoder.embed_texts([f"text {i}" for i in range(20)])
    assert report.added == 12
    after = (
        torch.get_num_threads(), logging.root.manager.disable, torch.nn.init.uniform_,
        torch.nn.init.normal_, constants.HF_HUB_OFFLINE, dict(os.environ),
    )
    assert after == before


def test_unfilled_parameters_is_for_the_building_thread_only() -> None:
    """A model built in another thread meanwhile is initialised as usual."""
    inside = threading.Event()
    release = threading.Event()
    skipped: list[torch.Tensor] = []

    def builder() -> None:
        with unfilled_parameters():
            skipped.append(torch.nn.init.uniform_(torch.zeros(100), 0.5, 1.0))
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=builder)
    thread.start()
    try:
        assert inside.wait(10)
        layer = torch.nn.Linear(64, 64)  # built here, while the other thread is inside the block
        filled = torch.nn.init.uniform_(torch.zeros(100), 0.5, 1.0)
    finally:
        release.set()
        thread.join()
    assert float(skipped[0].abs().max()) == 0.0  # left as it was
    assert float(filled.min()) >= 0.5
    assert float(layer.weight.detach().std()) > 0.01


def test_the_cli_splits_cores_between_lanes_and_the_library_keeps_it(tiny_model: Path, tmp_path: Path) -> None:
    """`index` sets the threads per lane once, at start-up; the run itself changes nothing more."""
    from mmsearch.runtime import cpu_count

    photos = noise_images(tmp_path / "photos", 8)
    result = CliRunner().invoke(
        app, ["--home", str(tmp_path / "home"), "--model", str(tiny_model), "--workers", "2",
              "index", str(photos), "--quiet"],
    )
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == max(1, cpu_count() // min(2, cpu_count()))
