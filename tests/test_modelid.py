"""A local model is known by what it is: a moved copy is accepted, another model refused."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import save_tiny_model
from mmsearch import modelid
from mmsearch.check import check_home
from mmsearch.cli import app
from mmsearch.modelspec import parse
from mmsearch.settings import resolve

runner = CliRunner()


def ok(*args: str):  # type: ignore[no-untyped-def]
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def meta(home: Path) -> dict[str, str]:
    with sqlite3.connect(home / "catalog.sqlite3") as conn:
        return dict(conn.execute("SELECT key, value FROM meta"))


def forget_hash(home: Path) -> None:
    """Make the home look like one made before hashes were recorded."""
    with sqlite3.connect(home / "catalog.sqlite3") as conn:
        conn.execute("DELETE FROM meta WHERE key IN ('model_hash', 'model_stamp')")


@pytest.fixture
def model(tmp_path: Path, tiny_model: Path) -> Path:
    """A copy of the tiny model that the test may move."""
    return Path(shutil.copytree(tiny_model, tmp_path / "models" / "first"))


def test_fingerprint_is_content_not_place(tmp_path: Path, tiny_model: Path) -> None:
    copy = Path(shutil.copytree(tiny_model, tmp_path / "copy"))
    a, b = parse(str(tiny_model)), parse(str(copy))
    assert modelid.fingerprint(a, modelid.model_files(a)) == modelid.fingerprint(b, modelid.model_files(b))
    config = copy / "open_clip_config.json"
    config.write_text(config.read_text().replace('"layers": 1', '"layers": 2', 1))
    assert modelid.fingerprint(a, modelid.model_files(a)) != modelid.fingerprint(b, modelid.model_files(b))
    assert modelid.model_files(parse(str(tmp_path))) is None  # not a model folder
    weights = parse(f"ViT-B-32:{tiny_model / 'open_clip_model.safetensors'}")
    assert modelid.model_files(weights) == [tiny_model / "open_clip_model.safetensors"]
    assert modelid.fingerprint(weights, modelid.model_files(weights)).startswith("sha256:")


def test_moved_model_folder_is_accepted(tmp_path: Path, model: Path, photo_dir: Path) -> None:
    home = tmp_path / "home"
    ok("--home", str(home), "--model", str(model), "index", "--quiet", str(photo_dir))
    recorded = meta(home)
    assert recorded["model"] == f"local-dir:{model}" and recorded["model_hash"].startswith("sha256:")
    sidecar = home / "images.faiss.json"
    index_bytes = (home / "images.faiss").read_bytes()

    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(model, moved)
    hits = ok("--home", str(home), "--model", str(moved), "search", "red", "--json").stdout.splitlines()
    assert len(hits) == 6
    assert meta(home)["model"] == f"local-dir:{moved}"  # the home now names the new place
    assert meta(home)["model_hash"] == recorded["model_hash"]
    assert json.loads(sidecar.read_text())["model"] == f"local-dir:{moved}"
    assert (home / "images.faiss").read_bytes() == index_bytes  # relabelled, not rebuilt
    assert len(ok("--home", str(home), "search", "red", "--json").stdout.splitlines()) == 6  # no --model needed
    assert json.loads(ok("--home", str(home), "status", "--json").stdout)["model"] == f"local-dir:{moved}"
    report = check_home(resolve(home=home))
    assert report.ok and report.findings == []


def test_another_model_is_still_refused(tmp_path: Path, model: Path, photo_dir: Path, other_tiny_model: Path) -> None:
    home = tmp_path / "home"
    ok("--home", str(home), "--model", str(model), "index", "--quiet", str(photo_dir))
    lookalike = save_tiny_model(tmp_path / "models" / "lookalike", seed=7)  # same architecture, other weights
    for other in (lookalike, other_tiny_model):
        line = one_error_line(runner.invoke(app, ["--home", str(home), "--model", str(other), "search", "red"]))
        assert line == (
            f"error: {home} was indexed with model local-dir:{model}, not local-dir:{other}; "
            f"drop --model to use local-dir:{model}, or pass --home DIR for a separate index, "
            f"or run `mmsearch --model local-dir:{other} reindex` to switch this home to it"
        )
    assert meta(home)["model"] == f"local-dir:{model}"


def test_unchanged_model_is_not_hashed_again(tmp_path: Path, model: Path, photo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    ok("--home", str(home), "--model", str(model), "index", "--quiet", str(photo_dir))
    calls = []
    real = modelid.fingerprint
    monkeypatch.setattr(modelid, "fingerprint", lambda *a: calls.append(a) or real(*a))
    ok("--home", str(home), "status")
    ok("--home", str(home), "--model", str(model), "search", "red")
    assert calls == []


def test_home_without_a_hash_records_it_on_first_open(tmp_path: Path, model: Path, photo_dir: Path) -> None:
    home = tmp_path / "home"
    ok("--home", str(home), "--model", str(model), "index", "--quiet", str(photo_dir))
    known = meta(home)["model_hash"]
    forget_hash(home)
    ok("--home", str(home), "status")
    assert meta(home)["model_hash"] == known


def test_home_without_a_hash_whose_model_is_gone(tmp_path: Path, model: Path, photo_dir: Path) -> None:
    """Nothing to recognise the model by: refused, with a way out that the test then follows."""
    home = tmp_path / "home"
    ok("--home", str(home), "--model", str(model), "index", "--quiet", str(photo_dir))
    forget_hash(home)
    moved = tmp_path / "moved"
    shutil.move(model, moved)
    line = one_error_line(runner.invoke(app, ["--home", str(home), "--model", str(moved), "search", "red"]))
    assert "not there any more" in line and f"ln -s {moved} {model}" in line

    model.symlink_to(moved)
    ok("--home", str(home), "--model", str(moved), "status")
    model.unlink()
    assert len(ok("--home", str(home), "--model", str(moved), "search", "red", "--json").stdout.splitlines()) == 6
    assert meta(home)["model"] == f"local-dir:{moved}"


def test_gone_model_without_model_option(tmp_path: Path, model: Path, photo_dir: Path) -> None:
    home = tmp_path / "home"
    ok("--home", str(home), "--model", str(model), "index", "--quiet", str(photo_dir))
    shutil.move(model, tmp_path / "moved")
    line = one_error_line(runner.invoke(app, ["--home", str(home), "search", "red"]))
    assert f"local-dir:{model}, is not there any more" in line and "--model NEWPATH" in line
    assert json.loads(ok("--home", str(home), "status", "--json").stdout)["images"] == 6  # needs no model


def test_moved_weights_file_is_accepted(tmp_path: Path, tiny_model: Path, photo_dir: Path) -> None:
    home = tmp_path / "home"
    weights = tmp_path / "a" / "w.safetensors"
    weights.parent.mkdir()
    shutil.copy(tiny_model / "open_clip_model.safetensors", weights)
    # a checkpoint spec names a registered architecture: the tiny one is not, so only the identity is checked
    spec = parse(f"ViT-B-32:{weights}")
    home.mkdir()
    from mmsearch.home import Home

    with Home.open(resolve(home=home, model=str(spec))) as h:
        h.catalog.set_meta({"model": spec.canonical, "dim": "32",
                            "model_hash": modelid.fingerprint(spec, modelid.model_files(spec)),
                            "model_stamp": modelid.stamp(modelid.model_files(spec))})
    moved = tmp_path / "b" / "w.safetensors"
    moved.parent.mkdir()
    shutil.move(weights, moved)
    with Home.open(resolve(home=home, model=f"ViT-B-32:{moved}")) as h:
        assert h.spec.path == moved and h.recorded_model == f"ViT-B-32:{moved}"
    line = one_error_line(runner.invoke(app, ["--home", str(home), "--model", f"ViT-L-14:{moved}", "status"]))
    assert "was indexed with model" in line  # the same bytes under another architecture are another model


def test_moved_model_keeps_the_reranker_tokens(tmp_path: Path, model: Path, photo_dir: Path) -> None:
    import torch

    from mmsearch.rerank import CrossAttentionScorer, TokenStore, save_scorer

    torch.manual_seed(3)
    save_scorer(CrossAttentionScorer(32), model)
    home = tmp_path / "home"
    ok("--home", str(home), "--model", str(model), "index", "--quiet", str(photo_dir))
    tokens = (home / "rerank" / "tokens.f16").read_bytes()
    moved = tmp_path / "moved"
    shutil.move(model, moved)
    ok("--home", str(home), "--model", str(moved), "search", "red", "--rerank")
    store = TokenStore.open(home, f"local-dir:{moved}")
    assert store is not None and len(store.rows) == 6  # relabelled, not reset
    assert (home / "rerank" / "tokens.f16").read_bytes() == tokens
