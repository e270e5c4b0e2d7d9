"""scripts/emoji_pairs.py: per-style pair files, leave-one-style-out sets, and extra styles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "emoji_pairs.py"


def _dataset(root: Path) -> None:
    rows = [
        ("twitter/0023-fe0f-20e3.png", "hash key", "twitter"),
        ("twitter/1f680.png", "rocket", "twitter"),
        ("facebook/1f680.png", "rocket", "facebook"),
        ("facebook/1f422.png", "turtle", "facebook"),
    ]
    for image, _, _ in rows:
        (root / image).parent.mkdir(parents=True, exist_ok=True)
        (root / image).write_bytes(b"png")
    (root / "pairs.jsonl").write_text(
        "".join(json.dumps({"image": i, "text": t, "style": s}) + "\n" for i, t, s in rows), encoding="utf-8")


def _read(path: Path) -> list[tuple[str, str]]:
    return [(Path(r["image"]).name, r["text"]) for r in map(json.loads, path.read_text().splitlines())]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True)


def test_styles_and_leave_one_out_sets(tmp_path):
    _dataset(tmp_path / "emoji")
    done = _run(str(tmp_path / "emoji"), str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert _read(out / "twitter.jsonl") == [("0023-fe0f-20e3.png", "hash key"), ("1f680.png", "rocket")]
    assert _read(out / "without-twitter.jsonl") == [("1f680.png", "rocket"), ("1f422.png", "turtle")]
    assert len(_read(out / "all.jsonl")) == 4
    first = json.loads((out / "all.jsonl").read_text().splitlines()[0])
    assert Path(first["image"]).is_absolute() and Path(first["image"]).is_file()


def test_an_extra_style_matches_names_with_or_without_fe0f_and_is_never_held_out(tmp_path):
    _dataset(tmp_path / "emoji")
    extra = tmp_path / "extra"
    extra.mkdir()
    for name in ("0023-20e3.png", "1f422.png", "1f9ff.png"):  # no fe0f; a concept the data set lacks
        (extra / name).write_bytes(b"png")
    done = _run(str(tmp_path / "emoji"), str(tmp_path / "out"), "--extra", f"noto={extra}")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert _read(out / "noto.jsonl") == [("0023-20e3.png", "hash key"), ("1f422.png", "turtle")]
    assert _read(out / "without-facebook.jsonl")[-2:] == _read(out / "noto.jsonl")
    assert _read(out / "without-twitter.jsonl")[-2:] == _read(out / "noto.jsonl")
    assert not (out / "without-noto.jsonl").exists()
    assert len(_read(out / "all.jsonl")) == 6


def test_a_bad_extra_is_one_clear_line(tmp_path):
    _dataset(tmp_path / "emoji")
    empty = tmp_path / "empty"
    empty.mkdir()
    for spec, words in ((f"twitter={empty}", "NAME=DIR"), (str(empty), "NAME=DIR"), (f"noto={empty}", "no PNG")):
        done = _run(str(tmp_path / "emoji"), str(tmp_path / "out"), "--extra", spec)
        assert done.returncode != 0
        assert words in done.stderr and len(done.stderr.strip().splitlines()) == 1
