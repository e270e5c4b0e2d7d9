"""mmsearch check [--repair] [--json]: finds every way catalog, index and files can
disagree, and --repair rebuilds the index from the catalog."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import mmsearch.index as index_module
from conftest import catalog_args, make_image
from mmsearch.cli import app
from mmsearch.index import VectorIndex
from mmsearch.store import Catalog

runner = CliRunner()


@pytest.fixture
def indexed(tmp_path: Path, tiny_model: Path, catalog_url: str | None) -> tuple[list[str], Path]:
    """A home of four pictures, on each catalog backend in turn."""
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        make_image(tmp_path / "photos" / f"{i}.png", colour)
    home = tmp_path / "home"
    base = ["--home", str(home), "--model", str(tiny_model), *catalog_args(catalog_url)]
    assert runner.invoke(app, [*base, "index", "--quiet", str(tmp_path / "photos")]).exit_code == 0
    return base, home


def check(base: list[str], *extra: str) -> tuple[int, dict]:
    result = runner.invoke(app, [*base, "check", "--json", *extra])
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout)


def codes(report: dict) -> set[str]:
    return {f["code"] for f in report["findings"]}


def tamper(home: Path, change) -> None:  # type: ignore[no-untyped-def]
    """Edit the saved index in place, keeping its sidecar's generation (so it looks current)."""
    path = home / "images.faiss"
    index = VectorIndex.load(path)
    change(index)
    index.save(path)


def test_healthy_home(indexed: tuple[list[str], Path]) -> None:
    base, _ = indexed
    code, report = check(base)
    assert code == 0 and report["ok"] and report["findings"] == []
    assert report["counts"]["image"] == {"catalog": 4, "index": 4}
    human = runner.invoke(app, [*base, "check"])
    assert human.exit_code == 0 and human.stdout.splitlines()[-1] == "ok"


def test_orphans_missing_and_differing_vectors_are_found_and_repaired(indexed: tuple[list[str], Path]) -> None:
    base, home = indexed

    def damage(index: VectorIndex) -> None:
        ids = index.ids()
        index.remove(ids[:1])  # a catalog item with no vector
        index.add(np.array([999], dtype=np.int64), np.ones((1, index.dim), dtype=np.float32))  # an orphan
        index.remove(ids[1:2])
        index.add(ids[1:2], -np.ones((1, index.dim), dtype=np.float32))  # a wrong vector

    tamper(home, damage)
    code, report = check(base)
    assert code == 1 and not report["ok"]
    assert {"orphan-vectors", "missing-vectors", "vector-differs"} <= codes(report)

    result = runner.invoke(app, [*base, "check", "--repair"])
    assert result.exit_code == 0, result.output
    assert "repaired: rebuilt images.faiss from the catalog: 4 vectors" in result.stdout
    code, report = check(base)
    assert code == 0 and report["findings"] == []


def test_stale_unreadable_mismatched_and_leftovers(indexed: tuple[list[str], Path], catalog_url) -> None:
    base, home = indexed
    with Catalog.open(catalog_url or home / "catalog.sqlite3", create=False) as catalog:
        catalog.set_meta({"generation.image": str(catalog.generation("image") + 5)})
    assert "stale-generation" in codes(check(base)[1])

    (home / "images.faiss").write_bytes(b"garbage")
    code, report = check(base)
    assert code == 1 and "unreadable-index" in codes(report)

    (home / ".images.faiss.abc123.tmp").write_bytes(b"half a save")
    (home / ".images.faiss.json.def456.tmp").write_bytes(b"{")
    assert [f["code"] for f in check(base)[1]["findings"]].count("temp-file") == 2
    code, report = check(base, "--repair")
    assert code == 0 and report["findings"] == []
    assert {"removed .images.faiss.abc123.tmp", "removed .images.faiss.json.def456.tmp"} <= set(report["repaired"])
    assert not (home / ".images.faiss.abc123.tmp").exists()

    sidecar = home / "images.faiss.json"
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "model": "ViT-B-32:openai"}))
    assert "model-mismatch" in codes(check(base)[1])


def test_files_missing_or_changed_on_disk_are_warnings(indexed: tuple[list[str], Path], tmp_path: Path) -> None:
    base, _ = indexed
    gone = tmp_path / "photos" / "0.png"
    gone.unlink()
    make_image(tmp_path / "photos" / "1.png", "black", size=(80, 60))
    code, report = check(base)
    assert code == 0 and report["ok"]  # a disk not mounted is no corruption
    assert report["missing_files"] == [str(gone)]
    assert {f["severity"] for f in report["findings"]} == {"warning"}
    assert codes(report) == {"missing-files", "changed-files"}


def test_check_on_a_home_that_does_not_exist(tmp_path: Path) -> None:
    result = runner.invoke(app, ["--home", str(tmp_path / "none"), "check"])
    assert result.exit_code != 0 and result.stderr.startswith("error: no catalog")


def test_index_files_are_written_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every index file is written to a temp file, fsynced, renamed, and its folder fsynced."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src: str, dst: object) -> None:
        events.append(("replace", f"{src} -> {dst}"))
        real_replace(src, dst)

    monkeypatch.setattr(index_module.os, "fsync", fsync)
    monkeypatch.setattr(index_module.os, "replace", replace)
    index = VectorIndex.empty("image", 4, "m")
    index.add(np.array([1, 2]), np.eye(2, 4, dtype=np.float32))
    target = tmp_path / "images.faiss"
    index.save(target)
    for name in ("images.faiss", "images.faiss.json"):
        [(i, (_, moved))] = [(i, e) for i, e in enumerate(events) if e[0] == "replace" and e[1].endswith(f"-> {tmp_path / name}")]
        tmp = moved.split(" -> ")[0]
        assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(f".{name}.")
        assert ("fsync", tmp) in events[:i]  # data on disk before the rename
        assert events[i + 1] == ("fsync", str(tmp_path))  # the rename itself made durable
    assert VectorIndex.load(target).count == 2
    assert target.stat().st_mode & 0o777 == 0o644  # readable by others sharing the home, like the catalog
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images.faiss", "images.faiss.json"]


def test_a_vector_of_the_wrong_size_is_found(indexed: tuple[list[str], Path], catalog_url) -> None:
    from sqlalchemy import update

    from mmsearch.schema import ImageRow

    base, home = indexed
    with Catalog.open(catalog_url or home / "catalog.sqlite3") as catalog:
        assert catalog.vector_dtype_name == "float16"
        with catalog.engine.begin() as conn:  # a float32 blob where the catalog holds float16
            conn.execute(update(ImageRow).where(ImageRow.id == 1).values(vector=bytes(32 * 4)))
    code, report = check(base)
    assert code != 0 and "bad-vector" in codes(report)
    assert any("float16" in f["message"] for f in report["findings"] if f["code"] == "bad-vector")
