"""Bad command-line input: one clear line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import make_image
from mmsearch.cli import app

runner = CliRunner()


def one_error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if not line.startswith("skipped ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def indexed(tmp_path: Path, tiny_model: Path) -> list[str]:
    make_image(tmp_path / "photos" / "a.jpg")
    base = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    assert runner.invoke(app, [*base, "index", "--quiet", str(tmp_path / "photos")]).exit_code == 0
    return base


def test_unknown_model_name(tmp_path: Path) -> None:
    make_image(tmp_path / "photos" / "a.jpg")
    result = runner.invoke(app, ["--home", str(tmp_path / "h"), "--model", "NoSuchNet:openai", "index", str(tmp_path / "photos")])
    assert "NoSuchNet" in one_error_line(result)
    result = runner.invoke(app, ["--home", str(tmp_path / "h"), "--model", "nosuchmodel", "index", str(tmp_path / "photos")])
    assert "nosuchmodel" in one_error_line(result)


def test_path_that_does_not_exist(tmp_path: Path, tiny_model: Path) -> None:
    missing = tmp_path / "nowhere"
    result = runner.invoke(app, ["--home", str(tmp_path / "h"), "--model", str(tiny_model), "index", str(missing)])
    assert str(missing) in one_error_line(result)


def test_search_on_empty_or_missing_home(tmp_path: Path, tiny_model: Path) -> None:
    result = runner.invoke(app, ["--home", str(tmp_path / "never"), "--model", str(tiny_model), "search", "cat"])
    assert "mmsearch index" in one_error_line(result)
    corpus = tmp_path / "texts.txt"
    corpus.write_text("a line\n")
    home = ["--home", str(tmp_path / "texts-only"), "--model", str(tiny_model)]
    assert runner.invoke(app, [*home, "add-texts", "--quiet", str(corpus)]).exit_code == 0
    assert "no images" in one_error_line(runner.invoke(app, [*home, "search", "cat"]))


def test_top_k_zero(indexed: list[str]) -> None:
    assert "--top-k" in one_error_line(runner.invoke(app, [*indexed, "search", "cat", "-k", "0"]))


def test_image_query_that_is_not_an_image(indexed: list[str], tmp_path: Path) -> None:
    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    assert str(fake) in one_error_line(runner.invoke(app, [*indexed, "search", "--image", str(fake)]))
    missing = tmp_path / "missing.png"
    assert str(missing) in one_error_line(runner.invoke(app, [*indexed, "search", "--image", str(missing)]))


def test_default_model_offline_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network, nothing cached. huggingface_hub reads HF_HUB_OFFLINE and HF_HOME once, at
    import, which may have happened (in a session fixture) before conftest set them; so the
    module's constants are set too. Without them the hub retries for ~45 s before failing."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    make_image(tmp_path / "photos" / "a.jpg")
    result = runner.invoke(app, ["--home", str(tmp_path / "h"), "index", "--quiet", str(tmp_path / "photos")])
    line = one_error_line(result)
    assert "no network" in line and "--model" in line
