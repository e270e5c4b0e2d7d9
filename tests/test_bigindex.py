"""The compressed ``ivfpq`` tier: chosen past a size, refined with exact vectors, mapped, added to, repaired."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mmsearch import bigindex
from mmsearch import index as index_mod
from mmsearch.index import VectorIndex, build_from_catalog, fits, open_index, sidecar_path, vectors_path
from mmsearch.store import Catalog

DIM = 32


def clustered(n: int, dim: int = DIM, seed: int = 0, centres: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    v = c[rng.integers(0, centres, n)] + 0.5 * rng.normal(size=(n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def fill(catalog: Catalog, vectors: np.ndarray, start: int = 0) -> list[int]:
    rows = [
        {"path": f"/p/{start + i}.jpg", "size": 1, "mtime_ns": 1, "content_hash": f"h{start + i}",
         "width": 1, "height": 1, "vector": v}
        for i, v in enumerate(vectors)
    ]
    return catalog.write_images(rows, [])


@pytest.fixture
def small_tiers(monkeypatch):
    monkeypatch.setattr(index_mod, "EXACT_MAX", 300)
    monkeypatch.setattr(index_mod, "COMPRESSED_MIN", 1200)


def exact_top(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    stored = vectors.astype(np.float16).astype(np.float32)
    return ids[np.argsort(-(queries @ stored.T), axis=1)[:, :k]]


def test_tiers_switch_at_thresholds(small_tiers):
    assert [index_mod.choose_index_type(n) for n in (299, 300, 1199, 1200)] == ["flat", "ivf", "ivf", "ivfpq"]


def test_built_from_catalog_refines_with_exact_vectors(tmp_path, small_tiers):
    vectors = clustered(3000)
    path = tmp_path / "images.faiss"
    with Catalog.open(tmp_path / "c.sqlite3") as catalog:
        ids = np.array(fill(catalog, vectors))
        idx = open_index(catalog, path, "image", DIM, "m")
        assert idx.index_type == "ivfpq" and idx.count == 3000
        meta = json.loads(sidecar_path(path).read_text())
        assert meta["refine"] == {"file": "images.faiss.f16", "dtype": "float16", "rows": int(ids.max()) + 1,
                                  "factor": bigindex.REFINE_FACTOR}
        assert meta["storage"].startswith("pq") and meta["quantizer"] == "IndexHNSWFlat"
        assert vectors_path(path).stat().st_size == meta["refine"]["rows"] * DIM * 2
        assert not list(tmp_path.glob(".*.tmp"))  # the temp file of exact vectors became the final one
        queries = clustered(50, seed=1)
        scores, found = idx.search(queries, 10)
        truth = exact_top(vectors, ids, queries, 10)
        recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
        assert recall >= 0.9
        # the scores are exact (float16 vectors), not the codes' approximations
        stored = vectors.astype(np.float16).astype(np.float32)
        np.testing.assert_allclose(scores[:, 0], (queries * stored[found[:, 0] - ids[0]]).sum(1), atol=1e-5)


def test_loaded_index_is_mapped_then_added_to_without_rebuild(tmp_path, small_tiers):
    vectors = clustered(3400)
    path = tmp_path / "images.faiss"
    with Catalog.open(tmp_path / "c.sqlite3") as catalog:
        fill(catalog, vectors[:3000])
        open_index(catalog, path, "image", DIM, "m")
        idx = open_index(catalog, path, "image", DIM, "m", on_rebuild=lambda _: pytest.fail("rebuilt"))
        assert idx.source == path  # memory-mapped, not read
        new_ids = fill(catalog, vectors[3000:], start=3000)
        idx.add(np.array(new_ids), vectors[3000:])
        assert idx.source is None and idx.count == 3400
        removed = np.array(new_ids[:50])
        assert idx.remove(removed) == 50
        catalog.write_images([], [], removed_ids=removed.tolist())
        idx.generation = catalog.generation("image")
        idx.save(path)
        again = open_index(catalog, path, "image", DIM, "m", on_rebuild=lambda _: pytest.fail("rebuilt"))
        assert again.count == 3350 and fits(again, again.count)
        _, found = again.search(vectors[3050:3100], 1)
        assert (found[:, 0] == np.array(new_ids[50:100])).mean() >= 0.85
        _, found = again.search(vectors[3000:3050], 20)
        assert not set(found.ravel().tolist()) & set(removed.tolist())


def test_short_file_of_exact_vectors_is_rebuilt(tmp_path, small_tiers):
    vectors = clustered(2000)
    path = tmp_path / "images.faiss"
    with Catalog.open(tmp_path / "c.sqlite3") as catalog:
        fill(catalog, vectors)
        open_index(catalog, path, "image", DIM, "m")
        with open(vectors_path(path), "r+b") as fh:
            fh.truncate(100)
        with pytest.raises(index_mod.IndexCorruptError, match="images.faiss.f16"):
            VectorIndex.load(path)
        rebuilt = []
        idx = open_index(catalog, path, "image", DIM, "m", on_rebuild=rebuilt.append)
        assert rebuilt and idx.count == 2000


def test_ivf_outgrows_into_ivfpq_and_back_with_hysteresis(tmp_path, small_tiers):
    vectors = clustered(1300)
    with Catalog.open(tmp_path / "c.sqlite3") as catalog:
        ids = fill(catalog, vectors[:1000])
        assert build_from_catalog(catalog, "image", DIM, "m").index_type == "ivf"
        fill(catalog, vectors[1000:], start=1000)
        big = build_from_catalog(catalog, "image", DIM, "m", tmp_path / "images.faiss")
        assert big.index_type == "ivfpq"
        assert not fits(VectorIndex("image", DIM, "m", "ivf", index_mod.new_faiss_index(DIM, "ivf", 1000)), 1300)
        assert fits(big, 700) and not fits(big, 500)  # kept down to half the threshold
        catalog.write_images([], [], removed_ids=ids[:100])
        big.discard()


def test_training_sample_within_budget(monkeypatch):
    monkeypatch.setattr(bigindex, "TRAIN_BUDGET_BYTES", 512 * 4 * 1000)
    assert bigindex.train_size(10_000_000, 512) == 1000
    assert bigindex.cells(10_000_000, 512) * bigindex.MIN_POINTS_PER_CENTROID <= 1000
    assert bigindex.code_bits(10_000_000, 512) < 8
    monkeypatch.undo()
    assert bigindex.train_size(10_000_000, 512) * 512 * 4 <= bigindex.TRAIN_BUDGET_BYTES
    assert bigindex.cells(10_000_000, 512) == 4096 and bigindex.code_bits(10_000_000, 512) == 8
    assert bigindex.subquantizers(512) == 64 and bigindex.subquantizers(36) == 4


def test_cli_home_with_compressed_index_is_checked_repaired_and_searched(tmp_path, tiny_model, monkeypatch):
    from typer.testing import CliRunner

    from mmsearch.cli import app
    from tests.conftest import make_image

    monkeypatch.setattr(index_mod, "EXACT_MAX", 2)
    monkeypatch.setattr(index_mod, "COMPRESSED_MIN", 3)
    for i, colour in enumerate(["red", "green", "blue", "yellow", "white"]):
        make_image(tmp_path / "photos" / f"{i}.png", colour)
    home = tmp_path / "home"
    base = ["--home", str(home), "--model", str(tiny_model)]
    runner = CliRunner()
    assert runner.invoke(app, [*base, "index", "--quiet", str(tmp_path / "photos")]).exit_code == 0
    assert runner.invoke(app, [*base, "search", "red", "--json"]).exit_code == 0  # rebuilds it as ivfpq
    assert json.loads((home / "images.faiss.json").read_text())["index_type"] == "ivfpq"
    (home / "images.faiss.f16").unlink()
    result = runner.invoke(app, [*base, "check", "--json"])
    assert "unreadable-index" in {f["code"] for f in json.loads(result.stdout)["findings"]}
    result = runner.invoke(app, [*base, "check", "--repair", "--json"])
    assert result.exit_code == 0, result.output
    meta = json.loads((home / "images.faiss.json").read_text())
    assert meta["index_type"] == "ivfpq" and meta["count"] == 5 and (home / "images.faiss.f16").exists()
    result = runner.invoke(app, [*base, "search", "--image", str(tmp_path / "photos" / "2.png"), "--json", "-k", "1"])
    assert result.exit_code == 0 and "2.png" in result.stdout.splitlines()[0]
