"""Text corpora with bad or awkward content: invalid UTF-8, empty lines, a huge line, duplicate ids."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.store import Catalog

runner = CliRunner()


def stored_texts(home: Path) -> dict[str, str]:
    with Catalog.open(home / "catalog.sqlite3", create=False) as catalog:
        rows = catalog.texts_by_id(catalog.ids("text").tolist())
    return {row["key"]: row["text"] for row in rows.values()}


def test_invalid_utf8_names_the_line(tmp_path: Path, tiny_model: Path) -> None:
    corpus = tmp_path / "bad.txt"
    corpus.write_bytes(b"fine\nalso fine\ncaf\xe9 au lait\n")
    result = runner.invoke(app, ["--home", str(tmp_path / "h"), "--model", str(tiny_model), "add-texts", str(corpus)])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.stderr.strip() == f"error: {corpus}:3: not valid UTF-8 (byte 18)"


def test_empty_lines_huge_line_and_duplicate_ids(tmp_path: Path, tiny_model: Path) -> None:
    home = tmp_path / "h"
    base = ["--home", str(home), "--model", str(tiny_model)]
    corpus = tmp_path / "c.jsonl"
    huge = "word " * 5000
    records = [
        {"id": "a", "text": "first a"},
        {"id": "b", "text": "   "},  # empty: skipped
        {"id": "h", "text": huge},
        {"id": "a", "text": "second a"},  # within one file the last occurrence wins
    ]
    corpus.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + "\n".join(json.dumps(r) for r in records[2:]) + "\n")
    result = runner.invoke(app, [*base, "add-texts", "--quiet", "--json", str(corpus)])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert (counts["added"], counts["skipped"], counts["duplicates"], counts["truncated"]) == (2, 2, 1, 1)
    assert "longer than the model's 77-token context and were truncated" in result.stderr
    assert stored_texts(home) == {"a": "second a", "h": huge.strip()}

    # a known id replaces the stored text (and its vector); unchanged texts are kept
    update = tmp_path / "u.jsonl"
    update.write_text(json.dumps({"id": "a", "text": "third a"}) + "\n" + json.dumps({"id": "h", "text": huge}) + "\n")
    result = runner.invoke(app, [*base, "add-texts", "--quiet", "--json", str(update)])
    counts = json.loads(result.stdout)
    assert (counts["added"], counts["updated"], counts["unchanged"]) == (0, 1, 1)
    assert stored_texts(home)["a"] == "third a"
    hits = runner.invoke(app, [*base, "search", "third a", "--texts", "-k", "5", "--json"])
    assert sorted(json.loads(line)["id"] for line in hits.stdout.splitlines()) == ["a", "h"]


def test_sigkill_mid_corpus_keeps_committed_chunks_and_the_next_run_continues(tmp_path: Path, tiny_model: Path) -> None:
    import signal

    import faults
    from mmsearch.check import check_home
    from mmsearch.settings import resolve

    home = tmp_path / "h"
    base = ["--home", str(home), "--model", str(tiny_model), "--batch-size", "1"]  # chunks of 128 texts
    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"text number {i}\n" for i in range(300)))
    child = faults.start([*base, "add-texts", "--quiet", str(corpus)], "in-transaction:3")
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    kept = stored_texts(home)
    assert len(kept) == 256  # two chunks committed, the third rolled back

    result = runner.invoke(app, [*base, "add-texts", "--quiet", "--json", str(corpus)])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert (counts["added"], counts["unchanged"], counts["updated"]) == (44, 256, 0)
    after = stored_texts(home)
    assert len(after) == 300 and {k: after[k] for k in kept} == kept
    report = check_home(resolve(home=home, model=str(tiny_model)))
    assert report.ok and report.counts["text"] == {"catalog": 300, "index": 300}
