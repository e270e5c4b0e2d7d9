"""SIGKILL the indexer at several points of a run: nothing indexed before is lost,
a second run completes, and catalog and FAISS index agree exactly afterwards."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import faults
from conftest import catalog_args, make_image
from mmsearch.check import check_home
from mmsearch.cli import app
from mmsearch.index import VectorIndex, temp_files
from mmsearch.settings import resolve
from mmsearch.store import Catalog

runner = CliRunner()


def picture(path: Path, seed: int, size: tuple[int, int] = (40, 32)) -> Path:
    rng = np.random.default_rng(seed)
    make_image(path, tuple(int(c) for c in rng.integers(0, 256, 3)), size)
    return path


def catalog_rows(home: Path, url: str | None = None) -> dict[str, int]:
    with Catalog.open(url or home / "catalog.sqlite3", create=False) as catalog:
        return {path: i for i, path in catalog.image_paths(catalog.ids("image").tolist()).items()}


def searchable(base: list[str]) -> set[str]:
    result = runner.invoke(app, [*base, "search", "anything", "-k", "100", "--json"])
    assert result.exit_code == 0, result.output
    return {json.loads(line)["path"] for line in result.stdout.splitlines()}


# Points of a run (6 new files, 1 rewritten, 1 deleted; batches of 2): reading
# the 3rd file (batch 1 committed, batch 2 half read), inside the 2nd catalog
# transaction, and in the final index save before the index or the sidecar rename.
# (``after-batch:N`` in faults.py kills right after a commit; decode:3 covers it.)
# On PostgreSQL the points that matter to the catalog: after a commit, and inside a transaction.
@pytest.mark.parametrize(("fault", "backend"), [
    *((fault, "sqlite") for fault in ["decode:3", "in-transaction:2", "rename:1", "rename:2"]),
    ("decode:3", "postgresql"), ("in-transaction:2", "postgresql"),
])
def test_sigkill_mid_index_loses_nothing(fault: str, backend: str, tmp_path: Path, tiny_model: Path, request) -> None:
    photos, home = tmp_path / "photos", tmp_path / "home"
    url = request.getfixturevalue("pg_server").new_database() if backend == "postgresql" else None
    base = ["--home", str(home), "--model", str(tiny_model), "--batch-size", "2", "--workers", "0", *catalog_args(url)]
    for i in range(4):
        picture(photos / "old" / f"{i}.png", i)
    assert runner.invoke(app, [*base, "index", "--quiet", str(photos)]).exit_code == 0
    for i in range(6):
        picture(photos / "new" / f"{i}.png", 100 + i)
    picture(photos / "old" / "0.png", 50, size=(48, 36))  # rewritten
    (photos / "old" / "1.png").unlink()

    child = faults.start([*base, "index", "--quiet", str(photos)], fault)
    child.join(120)
    assert child.exitcode == -signal.SIGKILL

    before = catalog_rows(home, url)
    assert len(before) >= 3  # at least the untouched old files
    on_disk_before = {p for p in before if os.path.exists(p)}
    # the lock died with the process; a reader works at once and sees every indexed item
    assert searchable(base) == on_disk_before

    again = runner.invoke(app, [*base, "index", "--quiet", "--json", str(photos)])
    assert again.exit_code == 0, again.output
    after = catalog_rows(home, url)
    for path in on_disk_before:
        assert after[path] == before[path]  # the same item, not re-added
    files = {str(p) for p in photos.rglob("*.png")}
    assert set(after) == files
    assert searchable(base) == files

    report = check_home(resolve(home=home, model=str(tiny_model), catalog=url))
    assert report.findings == [] and report.ok
    assert report.counts["image"] == {"catalog": 9, "index": 9}
    index = VectorIndex.load(home / "images.faiss")
    assert sorted(index.ids().tolist()) == sorted(after.values())
    assert temp_files(home / "images.faiss") == []
