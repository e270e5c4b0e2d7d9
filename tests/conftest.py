"""Shared fixtures: a tiny open_clip model saved in the local-dir layout, generated images,
and a home in a temporary folder. Nothing here downloads anything."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

# huggingface_hub reads this once, at import: set it before anything imports it,
# so no test ever waits on the network.
os.environ["HF_HUB_OFFLINE"] = "1"

TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_PREPROCESS = {"mean": [0.48, 0.46, 0.41], "std": [0.27, 0.26, 0.28], "size": 32}

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (240, 230, 20),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
}


def save_tiny_model(folder: Path, seed: int = 0, cfg: dict | None = None) -> Path:
    """A randomly initialised tiny CLIP in open_clip's local-dir layout."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = cfg or TINY_CFG
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": TINY_PREPROCESS})
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


TINY_COCA_CFG = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16,
        "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 9, "output_tokens": True,
    },
    "text_cfg": {
        "context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
        "embed_cls": True, "output_tokens": True,
    },
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, "attn_pooler_heads": 2},
    "custom_text": True,
}


def save_tiny_coca(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny open_clip CoCa in the local-dir layout.

    A freshly built CoCa's decoder projection to the vocabulary is all zeros
    (every text equally likely whatever the image), so it gets random
    weights here: a test of the decoder's scores could not fail otherwise.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = open_clip.CoCa(**{k: v for k, v in TINY_COCA_CFG.items() if k != "custom_text"})
    torch.nn.init.normal_(model.text_decoder.text_projection, std=0.5)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_COCA_CFG, "preprocess_cfg": TINY_PREPROCESS})
    )
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


@pytest.fixture(scope="session")
def tiny_coca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_coca(tmp_path_factory.mktemp("models") / "tiny-coca")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = json.loads(json.dumps(TINY_CFG))
    cfg["embed_dim"] = 24
    return save_tiny_model(tmp_path_factory.mktemp("models") / "other", seed=1, cfg=cfg)


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the user's home, model choice or network."""
    for var in ("MMSEARCH_HOME", "MMSEARCH_MODEL", "MMSEARCH_DEVICE", "MMSEARCH_BATCH_SIZE", "MMSEARCH_WORKERS", "MMSEARCH_INT8"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MMSEARCH_MAX_FILE_SIZE", raising=False)
    monkeypatch.delenv("MMSEARCH_CATALOG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture(autouse=True)
def torch_threads_restored() -> Iterator[None]:
    """A CLI command run in-process sets torch's thread count, as a front end does; undo it after."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    yield
    torch = sys.modules.get("torch")
    if torch is not None and before is not None and torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[object]:
    """A throwaway PostgreSQL cluster for the session (tests/pg.py); skips where none can be had."""
    import pg

    server = pg.start_server()
    yield server
    pg.remove(server)


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest) -> str | None:
    """Each backend in turn: None for the home's own SQLite file, else a fresh PostgreSQL database's URL."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("pg_server").new_database()


def catalog_args(url: str | None) -> list[str]:
    """The global option that puts a CLI call's catalog at ``url`` (nothing for SQLite)."""
    return [] if url is None else ["--catalog", url]


@pytest.fixture(scope="session")
def untrained_rerank_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CLIP plus a freshly initialised (untrained) re-ranker."""
    import shutil

    import torch

    from mmsearch.rerank import CrossAttentionScorer, save_scorer

    folder = tmp_path_factory.mktemp("models") / "tiny-rerank"
    shutil.copytree(tiny_model, folder)
    torch.manual_seed(3)
    save_scorer(CrossAttentionScorer(32), folder)
    return folder


def make_image(path: Path, colour: tuple[int, int, int] | str = "red", size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, colour)
    # a little structure so not every picture of a colour is identical
    for x in range(0, size[0], 7):
        img.putpixel((x, (x * 3) % size[1]), (x % 256, 100, 200))
    img.save(path)
    return path


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """Six small pictures, some in nested folders and with awkward names."""
    root = tmp_path / "photos"
    make_image(root / "red.jpg", COLOURS["red"])
    make_image(root / "green.png", COLOURS["green"])
    make_image(root / "nested" / "deeper" / "blue.webp", COLOURS["blue"])
    make_image(root / "with space" / "yellow car.jpg", COLOURS["yellow"])
    make_image(root / "ünïcødé" / "schwarz-黒.png", COLOURS["black"])
    make_image(root / "white.bmp", COLOURS["white"])
    return root


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def base(home: Path, tiny_model: Path) -> list[str]:
    """The global options of a CLI call on the test's home with the tiny model."""
    return ["--home", str(home), "--model", str(tiny_model)]


@pytest.fixture
def library(home: Path, tiny_model: Path, photo_dir: Path) -> Iterator[object]:
    """A :class:`mmsearch.Library` over the six test pictures."""
    from mmsearch import Library

    lib = Library.open(home, model=str(tiny_model))
    lib.add_images([photo_dir])
    yield lib
    lib.close()
