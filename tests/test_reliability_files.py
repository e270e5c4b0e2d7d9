"""Hostile files in indexed folders and odd queries: no hang, no runaway memory, one line each."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from conftest import make_image
from mmsearch.cli import app

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
#: Heap the CLI may use in the subprocess tests. RLIMIT_DATA rather than
#: RLIMIT_AS: importing a CUDA build of torch reserves gigabytes of address
#: space it never uses, while reading /dev/zero whole needs heap without end.
HEAP_LIMIT = 3 << 30


#: Runs the CLI once per argument list (JSON on argv), in one process: one torch import for all.
_CHILD = """
import json, sys
from mmsearch.cli import app
for args in json.loads(sys.argv[1]):
    try:
        app(args)
    except SystemExit as exc:
        if exc.code:
            raise
    print("-- end of run", flush=True)
    print("-- end of run", file=sys.stderr, flush=True)
"""


def run_cli(*runs: list[str], timeout: float = 120) -> list[tuple[str, str]]:
    """(stdout, stderr) of each CLI run, in a child process with a heap ceiling and a deadline.

    A regression (a blocking open, a read without end) fails the test instead of hanging it.
    """

    def limit_heap() -> None:
        resource.setrlimit(resource.RLIMIT_DATA, (HEAP_LIMIT, HEAP_LIMIT))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(runs)], capture_output=True, text=True, timeout=timeout,
            preexec_fn=limit_heap, env=env, cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"mmsearch still running after {timeout} s")
    assert done.returncode == 0, done.stderr
    outs, errs = done.stdout.split("-- end of run\n"), done.stderr.split("-- end of run\n")
    assert len(outs) == len(errs) == len(runs) + 1, done.stderr
    return list(zip(outs[:-1], errs[:-1]))


def skip_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("skipped ")]


def test_fifo_and_device_links_are_skipped_unread_on_every_run(tmp_path: Path, tiny_model: Path) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    make_image(root / "red.jpg", (220, 30, 30))
    make_image(root / "sub" / "blue.png", (30, 40, 220))
    os.mkfifo(root / "pipe.jpg")
    os.symlink("/dev/zero", root / "x.jpg")
    os.symlink("/dev/urandom", root / "sub" / "y.png")
    base = ["--home", str(home), "--model", str(tiny_model), "index", "--quiet", "--json", str(root)]
    want = {
        f"skipped {root / 'pipe.jpg'}: a FIFO (named pipe), not a file",
        f"skipped {root / 'x.jpg'}: a device, not a file",
        f"skipped {root / 'sub' / 'y.png'}: a device, not a file",
    }
    runs = run_cli(base, base)
    for (stdout, stderr), (added, unchanged) in zip(runs, ((2, 0), (0, 2))):
        assert "Traceback" not in stderr and "MemoryError" not in stderr
        counts = json.loads(stdout.splitlines()[-1])
        assert (counts["added"], counts["unchanged"], counts["skipped"]) == (added, unchanged, 3), stderr
        assert set(skip_lines(stderr)) == want and len(skip_lines(stderr)) == 3, stderr


def test_file_over_max_file_size_is_skipped_with_one_line(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    small = make_image(root / "small.png", (30, 200, 40), size=(16, 16))
    big = root / "big.png"
    Image.effect_noise((300, 300), 80).convert("RGB").save(big)  # noise: does not compress
    assert small.stat().st_size < 20_000 < big.stat().st_size
    base = ["--home", str(home), "--model", str(tiny_model), "index", "--quiet", "--json"]
    result = runner.invoke(app, [*base, "--max-file-size", "20kB", str(root)])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout.splitlines()[-1])
    assert (counts["added"], counts["skipped"]) == (1, 1)
    assert skip_lines(result.stderr) == [f"skipped {big}: larger than the 20 kB limit (--max-file-size)"]
    # not remembered as a bad file: with a larger limit (here from the environment) it is read
    monkeypatch.setenv("MMSEARCH_MAX_FILE_SIZE", "1MB")
    again = runner.invoke(app, [*base, str(root)])
    counts = json.loads(again.stdout.splitlines()[-1])
    assert (counts["added"], counts["unchanged"], counts["skipped"]) == (1, 1, 0), again.output
    bad = runner.invoke(app, [*base, "--max-file-size", "huge", str(root)])
    assert bad.exit_code == 2 and bad.stderr.strip() == "error: --max-file-size 'huge' is not a size (say 200MB, 1G or 1.5GiB)"


def test_png_with_a_large_text_chunk_is_indexed(tmp_path: Path, tiny_model: Path) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    root.mkdir()
    info = PngImagePlugin.PngInfo()
    info.add_text("Description", "x" * (PngImagePlugin.MAX_TEXT_CHUNK + 1000), zip=True)
    Image.new("RGB", (40, 30), "green").save(root / "described.png", pnginfo=info)
    result = runner.invoke(app, ["--home", str(home), "--model", str(tiny_model), "index", "-q", "--json", str(root)])
    counts = json.loads(result.stdout.splitlines()[-1])
    assert (counts["added"], counts["skipped"]) == (1, 0), result.output


def test_svg_and_other_names_are_counted_as_ignored(tmp_path: Path, tiny_model: Path) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    make_image(root / "red.jpg")
    (root / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (root / "icons" / "a.SVG").parent.mkdir()
    (root / "icons" / "a.SVG").write_text("<svg/>")
    (root / "notes.txt").write_text("hello")
    base = ["--home", str(home), "--model", str(tiny_model), "index", "--quiet"]
    result = runner.invoke(app, [*base, "--json", str(root)])
    counts = json.loads(result.stdout.splitlines()[-1])
    assert counts["added"] == 1 and counts["ignored"] == 3 and counts["skipped"] == 0
    assert counts["ignored_extensions"] == {".svg": 2, ".txt": 1}
    assert {"added", "updated", "unchanged", "removed", "skipped", "reused", "seconds"} <= counts.keys()
    assert "ignored 2 .svg file(s): SVG (vector) images are not supported" in result.stderr
    plain = runner.invoke(app, [*base, str(root)])
    assert "skipped 0, ignored 3 (" in plain.stdout


@pytest.fixture
def indexed(tmp_path: Path, tiny_model: Path) -> tuple[list[str], Path]:
    """A home holding pictures with a newline, a tab and an escape in their names; the global options."""
    root, home = tmp_path / "photos", tmp_path / "home"
    for i, name in enumerate(("new\nline.jpg", "tab\there.png", "esc\x1b[31mred.jpg", "plain.jpg")):
        make_image(root / name, (40 * i, 100, 200))
    base = ["--home", str(home), "--model", str(tiny_model)]
    result = runner.invoke(app, [*base, "index", "--quiet", str(root)])
    assert result.exit_code == 0, result.output
    return base, root


def test_control_characters_in_names_print_on_one_line(indexed: tuple[list[str], Path]) -> None:
    base, root = indexed
    human = runner.invoke(app, [*base, "search", "a picture", "-k", "10"])
    lines = human.stdout.splitlines()
    assert len(lines) == 4 and all(line.lstrip()[0].isdigit() for line in lines), lines
    shown = "\n".join(lines)
    assert "new\\nline.jpg" in shown and "tab\\there.png" in shown and "esc\\x1b[31mred.jpg" in shown
    assert "\x1b" not in human.stdout and "\t" not in human.stdout
    exact = runner.invoke(app, [*base, "search", "a picture", "-k", "10", "--json"])
    paths = {json.loads(line)["path"] for line in exact.stdout.splitlines()}
    assert str(root / "new\nline.jpg") in paths and str(root / "esc\x1b[31mred.jpg") in paths
    # a skipped file with a newline in its name: one line too
    (root / "bad\nname.jpg").write_text("not a picture")
    again = runner.invoke(app, [*base, "index", "--quiet", str(root)])
    assert skip_lines(again.stderr) == [f"skipped {root}/bad\\nname.jpg: not an image (or a format this tool cannot read)"]


def test_text_results_with_newlines_print_on_one_line(tmp_path: Path, tiny_model: Path) -> None:
    corpus = tmp_path / "texts.jsonl"
    corpus.write_text(
        json.dumps({"id": "a", "text": "first line\nsecond line"}) + "\n" + json.dumps({"id": "b", "text": "tab\there"}) + "\n"
    )
    base = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    assert runner.invoke(app, [*base, "add-texts", "--quiet", str(corpus)]).exit_code == 0
    human = runner.invoke(app, [*base, "search", "--texts", "words"])
    assert len(human.stdout.splitlines()) == 2 and "first line\\nsecond line" in human.stdout
    exact = runner.invoke(app, [*base, "search", "--texts", "words", "--json"])
    assert {json.loads(line)["text"] for line in exact.stdout.splitlines()} == {"first line\nsecond line", "tab\there"}


def test_a_folder_given_as_query_image_is_not_a_file(indexed: tuple[list[str], Path], tmp_path: Path) -> None:
    base, root = indexed
    album = tmp_path / "album.jpg"  # a folder named like a picture
    album.mkdir()
    for args in (["--image", str(root)], ["--image", str(album)], [f"sunset + {album}"]):
        result = runner.invoke(app, [*base, "search", *args])
        assert result.exit_code == 1, args
        [line] = result.stderr.splitlines()
        assert line.startswith("error: ") and "a folder, not a file" in line, line
    os.mkfifo(tmp_path / "pipe.jpg")
    result = runner.invoke(app, [*base, "search", "--image", str(tmp_path / "pipe.jpg")])
    assert result.stderr.strip() == f"error: {tmp_path / 'pipe.jpg'}: a FIFO (named pipe), not a file"
    missing = runner.invoke(app, [*base, "search", "--image", str(tmp_path / "nope.jpg")])
    assert missing.stderr.strip() == f"error: no such image: {tmp_path / 'nope.jpg'}"


def test_query_longer_than_the_context_warns(indexed: tuple[list[str], Path]) -> None:
    base, _root = indexed
    long_query = " ".join(["a red bicycle leaning on a wall"] * 20)  # ~140 tokens, over 77
    result = runner.invoke(app, [*base, "search", long_query, "-k", "2"])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "context" in line]
    assert len(warnings) == 1 and "longer than the model's 77-token context and was truncated" in warnings[0]
    assert len(result.stdout.splitlines()) == 2  # results still come, on stdout
    short = runner.invoke(app, [*base, "search", "a red bicycle", "-k", "2"])
    assert short.stderr == ""
