"""search --preview: inline thumbnails for kitty and iTerm2, one line where the terminal has none."""

from __future__ import annotations

import base64
import io
import re

import pytest
from PIL import Image
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.preview import KITTY_CHUNK, PREVIEW_PIXELS, detect, iterm2_image, kitty_image, unsupported

runner = CliRunner()

#: Every variable detection reads, cleared so the test's own terminal does not leak in.
CLEAR = {name: None for name in ("KITTY_WINDOW_ID", "TERM", "TERM_PROGRAM", "LC_TERMINAL", "TMUX")}

KITTY = re.compile(r"\x1b_G([^;]*);([^\x1b]*)\x1b\\")
ITERM = re.compile(r"\x1b\]1337;File=([^:]*):([^\x07]*)\x07")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"KITTY_WINDOW_ID": "1", "TERM": "xterm-kitty"}, "kitty"),
        ({"TERM": "xterm-kitty"}, "kitty"),
        ({"TERM_PROGRAM": "ghostty", "TERM": "xterm-ghostty"}, "kitty"),
        ({"TERM_PROGRAM": "iTerm.app", "TERM": "xterm-256color"}, "iterm2"),
        ({"LC_TERMINAL": "iTerm2"}, "iterm2"),
        ({"TERM_PROGRAM": "WezTerm"}, "iterm2"),
        ({"TERM": "xterm-256color"}, None),
        ({"TERM": "tmux-256color", "KITTY_WINDOW_ID": "1"}, None),
        ({"TMUX": "/tmp/tmux-0/default,1,0", "TERM_PROGRAM": "iTerm.app"}, None),
        ({}, None),
    ],
)
def test_detect(env: dict[str, str], expected: str | None) -> None:
    assert detect(env) == expected


def test_unsupported_is_one_line_naming_the_terminal() -> None:
    line = unsupported({"TERM": "xterm-256color"})
    assert "\n" not in line and "xterm-256color" in line and "sixel" in line
    assert "tmux" in unsupported({"TMUX": "x", "TERM": "screen"})


def png(size: tuple[int, int], noise: bool = False) -> bytes:
    img = Image.effect_noise(size, 80).convert("RGB") if noise else Image.new("RGB", size, (200, 10, 10))
    out = io.BytesIO()
    img.save(out, "PNG")
    return out.getvalue()


def test_kitty_sends_a_large_picture_in_chunks() -> None:
    data = png((300, 200), noise=True)
    parts = KITTY.findall(kitty_image(data, columns=8))
    assert len(parts) > 2
    assert parts[0][0] == "a=T,f=100,q=2,c=8,m=1"
    assert [head for head, _ in parts[1:]] == ["m=1"] * (len(parts) - 2) + ["m=0"]
    assert all(len(chunk) <= KITTY_CHUNK for _, chunk in parts)
    assert base64.b64decode("".join(chunk for _, chunk in parts)) == data


def test_kitty_small_picture_is_one_sequence_and_iterm2_names_its_size() -> None:
    data = png((20, 10))
    parts = KITTY.findall(kitty_image(data))
    assert len(parts) == 1 and parts[0][0].endswith("m=0")
    found = ITERM.fullmatch(iterm2_image(data, columns=6))
    assert found is not None
    args = dict(item.split("=") for item in found.group(1).split(";"))
    assert args == {"inline": "1", "size": str(len(data)), "width": "6", "preserveAspectRatio": "1"}
    assert base64.b64decode(found.group(2)) == data


def drawn_pictures(stdout: str, pattern: re.Pattern[str]) -> list[Image.Image]:
    out = []
    for line in stdout.splitlines():
        chunks = pattern.findall(line)
        if chunks:
            out.append(Image.open(io.BytesIO(base64.b64decode("".join(c for _, c in chunks)))))
    return out


@pytest.mark.parametrize(
    "env, pattern",
    [({"KITTY_WINDOW_ID": "3", "TERM": "xterm-kitty"}, KITTY), ({"TERM_PROGRAM": "iTerm.app"}, ITERM)],
)
def test_search_preview_draws_each_result(library, base, env, pattern, tmp_path) -> None:
    result = runner.invoke(app, [*base, "search", "red", "-k", "3", "--preview"], env={**CLEAR, **env})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    pictures = drawn_pictures(result.stdout, pattern)
    assert len(pictures) == 3
    for picture in pictures:
        assert picture.format == "PNG" and max(picture.size) <= PREVIEW_PIXELS
    for number, line in enumerate(lines, 1):  # each line: the picture, then the result as without --preview
        assert re.sub(r"\x1b[_\]].*?(\x1b\\|\x07)", "", line).startswith(f"{number:>3}  ")
    assert "--preview" not in result.stderr


def test_search_preview_elsewhere_says_so_once(library, base) -> None:
    plain = runner.invoke(app, [*base, "search", "red", "-k", "3"], env=CLEAR)
    result = runner.invoke(app, [*base, "search", "red", "-k", "3", "--preview"], env={**CLEAR, "TERM": "xterm"})
    assert result.exit_code == 0
    assert result.stdout == plain.stdout and "\x1b" not in result.stdout
    notes = [line for line in result.stderr.splitlines() if "--preview" in line]
    assert len(notes) == 1 and "xterm" in notes[0]


def test_search_preview_with_json_keeps_json_clean(library, base) -> None:
    result = runner.invoke(
        app, [*base, "search", "red", "-k", "2", "--json", "--preview"], env={**CLEAR, "KITTY_WINDOW_ID": "1"}
    )
    assert result.exit_code == 0 and "\x1b" not in result.stdout
    assert len(result.stdout.splitlines()) == 2
    assert len([line for line in result.stderr.splitlines() if "--preview" in line]) == 1
