"""Two processes on one home: a search while an index runs sees a consistent state;
a second writer is refused with one clear line; nothing is corrupted."""

from __future__ import annotations

import json
import time
from pathlib import Path

from typer.testing import CliRunner

import faults
from conftest import catalog_args
from mmsearch.check import check_home, writer_pid
from mmsearch.cli import app
from mmsearch.settings import resolve
from mmsearch.store import Catalog, catalog_exists
from test_crash import picture

runner = CliRunner()


def test_search_and_second_writer_while_index_runs(tmp_path: Path, tiny_model: Path, catalog_url) -> None:
    photos, home = tmp_path / "photos", tmp_path / "home"
    files = {str(picture(photos / f"{i:02}.png", i)) for i in range(10)}
    base = ["--home", str(home), "--model", str(tiny_model), "--batch-size", "2", "--workers", "0",
            *catalog_args(catalog_url)]
    settings = resolve(home=home, model=str(tiny_model), catalog=catalog_url)
    # on PostgreSQL, a second machine: its own home folder on the same catalog
    other_home = tmp_path / "other-home"
    other = ["--home", str(other_home), "--model", str(tiny_model), *catalog_args(catalog_url)]
    # the writer pauses after its second committed batch (of 2 files) until `gate` exists
    gate = tmp_path / "gate"
    writer = faults.start([*base, "index", "--quiet", str(photos)], f"hold:2:{gate}")
    try:
        deadline = time.monotonic() + 60
        while writer.is_alive() and time.monotonic() < deadline:
            if catalog_exists(catalog_url or home / "catalog.sqlite3"):
                with Catalog.open(catalog_url or home / "catalog.sqlite3", create=False) as catalog:
                    if catalog.count("image") >= 4:
                        break
            time.sleep(0.05)
        assert writer.is_alive()

        seen_counts = []
        for _ in range(2):
            result = runner.invoke(app, [*base, "search", "a photo", "-k", "100", "--json"])
            assert result.exit_code == 0, result.output
            paths = [json.loads(line)["path"] for line in result.stdout.splitlines()]
            assert paths and len(paths) == len(set(paths)) and set(paths) <= files
            seen_counts.append(len(paths))
        assert writer_pid(settings) == writer.pid

        second = runner.invoke(app, [*base, "index", "--quiet", str(photos)])
        assert second.exit_code != 0
        assert second.stderr.strip().splitlines() == [
            f"error: {home} is being written by pid {writer.pid}; wait for it to finish"
        ]
        if catalog_url is not None:
            # another home on the same catalog: it searches what is committed without indexing
            # anything (its own FAISS cache is built from the catalog), and its writer waits its turn
            result = runner.invoke(app, [*other, "search", "a photo", "-k", "100", "--json"])
            assert result.exit_code == 0, result.output
            assert len(result.stdout.splitlines()) == 4
            second_machine = runner.invoke(app, [*other, "index", "--quiet", str(photos)])
            assert second_machine.exit_code != 0
            lines = second_machine.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: catalog {catalog_url} is being written by pid {writer.pid} on ")
            assert lines[0].endswith("; wait for it to finish")
        # a reader's check mid-run: the lagging index file is expected, not a problem
        report = check_home(settings)
        assert report.writer_pid == writer.pid and report.ok, report.findings
        assert writer.is_alive()
        gate.touch()
    finally:
        gate.touch()
        writer.join(60)
    assert writer.exitcode == 0
    assert seen_counts == [4, 4]  # exactly the two committed batches, never half of one

    final = check_home(settings)
    assert final.findings == [] and final.counts["image"] == {"catalog": 10, "index": 10}
    result = runner.invoke(app, [*base, "search", "a photo", "-k", "100", "--json"])
    assert {json.loads(line)["path"] for line in result.stdout.splitlines()} == files
    if catalog_url is not None:  # the other home's cache is stale now, and rebuilt
        again = runner.invoke(app, [*other, "search", "a photo", "-k", "100", "--json"])
        assert [json.loads(line) for line in again.stdout.splitlines()] == [
            json.loads(line) for line in result.stdout.splitlines()
        ]


def test_processes_opening_a_new_catalog_at_once(tmp_path: Path, catalog_url) -> None:
    """The first open migrates; the others wait for it (a lock file, or an advisory lock) instead of failing halfway."""
    from concurrent.futures import ThreadPoolExecutor

    path = catalog_url or tmp_path / "home" / "catalog.sqlite3"

    def open_and_count(_: int) -> int:
        with Catalog.open(path) as catalog:
            return catalog.count("image")

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(open_and_count, range(6))) == [0] * 6
