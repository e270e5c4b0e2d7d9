"""Every command through the CLI, as scripts and people use it."""

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from typer.main import get_command
from typer.testing import CliRunner

from mmsearch.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _all_commands() -> list[tuple[str, click.Command]]:
    group = get_command(app)
    return [(name, group.get_command(None, name)) for name in group.list_commands(None)]


def test_every_command_and_option_has_help():
    group = get_command(app)
    missing = [p.name for p in group.params if isinstance(p, click.Option) and not p.help]
    for name, command in _all_commands():
        if not (command.help or "").strip():
            missing.append(name)
        for param in command.params:
            if not getattr(param, "help", None) and param.name != "ctx":
                missing.append(f"{name} {param.name}")
    assert missing == []
    for name, _ in _all_commands():
        assert run(name, "--help").exit_code == 0


def test_index_json_contract_and_incremental(base, photo_dir):
    first = run(*base, "index", photo_dir, "--json", "--quiet")
    assert first.exit_code == 0, first.output
    counts = json.loads(first.stdout.strip().splitlines()[-1])
    for key in ("added", "updated", "unchanged", "removed", "skipped"):
        assert isinstance(counts[key], int)
    assert counts["added"] == 6
    again = json.loads(run(*base, "index", photo_dir, "--json", "-q").stdout.strip().splitlines()[-1])
    assert (again["added"], again["unchanged"]) == (0, 6)


def test_skipped_file_is_one_stderr_line_and_strict_fails(base, photo_dir):
    (photo_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    result = run(*base, "index", photo_dir, "--quiet")
    assert result.exit_code == 0
    assert [line for line in result.stderr.splitlines() if "broken.jpg" in line] == [
        f"skipped {photo_dir / 'broken.jpg'}: " + result.stderr.split("broken.jpg: ", 1)[1].splitlines()[0]
    ]
    assert "skipped 1" in result.stdout
    assert run(*base, "index", photo_dir, "--quiet", "--strict").exit_code == 3


def test_search_all_four_directions(base, photo_dir, tmp_path):
    corpus = tmp_path / "caps.csv"
    corpus.write_text("id,text\nr,a red thing\ng,a green thing\n")
    assert run(*base, "index", photo_dir, "-q").exit_code == 0
    assert run(*base, "add-texts", corpus, "-q").exit_code == 0

    lines = run(*base, "search", "a red thing", "--json", "-k", "3").stdout.strip().splitlines()
    hits = [json.loads(line) for line in lines]
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(set(h) >= {"rank", "score", "id", "path"} and Path(h["path"]).is_absolute() for h in hits)

    by_image = [json.loads(x) for x in run(*base, "search", "--image", photo_dir / "red.jpg", "--json").stdout.splitlines()]
    assert by_image[0]["path"] == str(photo_dir / "red.jpg")

    texts = [json.loads(x) for x in run(*base, "search", "--image", photo_dir / "red.jpg", "--texts", "--json").stdout.splitlines()]
    assert {t["id"] for t in texts} == {"r", "g"} and all("text" in t and "path" not in t for t in texts)

    t2t = [json.loads(x) for x in run(*base, "search", "a green thing", "--texts", "--json", "-k", "1").stdout.splitlines()]
    assert t2t == [{"rank": 1, "score": pytest.approx(1.0, abs=1e-4), "id": "g", "text": "a green thing", "relevance": pytest.approx(t2t[0]["relevance"])}]

    table = run(*base, "search", "red")
    assert table.exit_code == 0 and str(photo_dir) in table.stdout and "  1  " in table.stdout


def test_status(base, photo_dir, home):
    empty = json.loads(run("--home", home, "status", "--json").stdout)
    assert (empty["images"], empty["texts"], empty["model"]) == (0, 0, None)
    run(*base, "index", photo_dir, "-q")
    info = json.loads(run("--home", home, "status", "--json").stdout)
    assert info["images"] == 6 and info["dim"] == 32 and info["model"].startswith("local-dir:")
    assert info["disk_bytes"] > 0
    assert "images:  6" in run("--home", home, "status").stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["index", "/no/such/folder"], "no such file or folder: /no/such/folder"),
        (["search", "cat"], "no catalog"),
        (["--model", "NoSuchNet:openai", "index", "."], "unknown model architecture"),
        (["--model", "ViT-B-32:laion2b_s34b_b79k", "add-texts", "corpus.txt"], "no network"),
    ],
)
def test_errors_are_one_line_without_traceback(home, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("hello\n")
    result = run("--home", home, *args)
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_other_model_on_existing_home(base, photo_dir, home, other_tiny_model):
    run(*base, "index", photo_dir, "-q")
    result = run("--home", home, "--model", other_tiny_model, "search", "x")
    assert result.exit_code == 1 and "was indexed with model" in result.stderr
    # without --model, the home's own model is used
    assert run("--home", home, "search", "x", "-k", "1").exit_code == 0


def test_search_k_zero_and_nothing_to_search(base, photo_dir):
    run(*base, "index", photo_dir, "-q")
    assert "at least 1" in run(*base, "search", "cat", "-k", "0").stderr
    assert run(*base, "search").exit_code == 2


def test_python_dash_m_and_version(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mmsearch", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("mmsearch ")
    # --help must not import torch (it takes seconds)
    code = "import sys; from mmsearch.cli import app; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ray_takes_an_optional_address():
    from mmsearch.cli import optional_values

    assert optional_values(["index", "photos", "--ray"]) == ["index", "photos", "--ray="]
    assert optional_values(["index", "--ray", "photos"]) == ["index", "--ray=", "photos"]
    assert optional_values(["index", "--ray", "ray://head:10001", "p"]) == ["index", "--ray", "ray://head:10001", "p"]
    assert optional_values(["index", "--ray", "10.0.0.5:6379", "p"]) == ["index", "--ray", "10.0.0.5:6379", "p"]
