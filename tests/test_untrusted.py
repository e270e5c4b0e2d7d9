"""Model files are never unpickled with code execution: a malicious checkpoint is
refused with one clear line, and the code in it never runs."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import TINY_CFG, TINY_PREPROCESS, make_image
from mmsearch.cli import app

runner = CliRunner()
TINY_NAME = "mmsearch-test-tiny"


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}, "hook": Payload(marker)}, path)
    return path


@pytest.fixture(scope="module")
def tiny_architecture(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Register the tiny config under a name, so NAME:/path/ckpt specs can use it."""
    import open_clip

    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{TINY_NAME}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(folder)
    return TINY_NAME


def assert_refused(result, marker: Path) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused to load" in lines[0], lines
    assert "its pickle would call posix.system" in lines[0]
    assert "Traceback" not in result.output
    assert not marker.exists(), "the pickled payload ran"


def test_payload_is_real(tmp_path: Path) -> None:
    """Control: the same file, unpickled the unsafe way, does run its code."""
    marker = tmp_path / "pwned"
    torch.load(evil_checkpoint(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_malicious_checkpoint_file_is_refused(tmp_path: Path, tiny_architecture: str) -> None:
    marker = tmp_path / "pwned"
    ckpt = evil_checkpoint(tmp_path / "evil.pt", marker)
    make_image(tmp_path / "photos" / "a.jpg")
    result = runner.invoke(
        app, ["--home", str(tmp_path / "home"), "--model", f"{tiny_architecture}:{ckpt}", "index", str(tmp_path / "photos")]
    )
    assert_refused(result, marker)
    assert str(ckpt) in result.stderr


def test_malicious_bin_in_model_dir_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": TINY_PREPROCESS}))
    evil_checkpoint(model_dir / "open_clip_pytorch_model.bin", marker)
    make_image(tmp_path / "photos" / "a.jpg")
    home = tmp_path / "home"
    result = runner.invoke(app, ["--home", str(home), "--model", str(model_dir), "index", str(tmp_path / "photos")])
    assert_refused(result, marker)
    result = runner.invoke(app, ["--home", str(home), "--model", str(model_dir), "search", "anything"])
    assert result.exit_code != 0 and not marker.exists()


def test_plain_state_dict_bin_loads(tmp_path: Path, tiny_model: Path) -> None:
    """A torch state dict (no code in it) is accepted: the guard refuses only pickled code."""
    from safetensors.torch import load_file

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model, model_dir)
    weights = model_dir / "open_clip_model.safetensors"
    torch.save(load_file(weights), model_dir / "open_clip_pytorch_model.bin")
    weights.unlink()
    make_image(tmp_path / "photos" / "a.jpg")
    result = runner.invoke(app, ["--home", str(tmp_path / "home"), "--model", str(model_dir), "index", "--quiet", str(tmp_path / "photos")])
    assert result.exit_code == 0, result.output
