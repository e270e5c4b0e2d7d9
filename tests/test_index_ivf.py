"""The ANN (IVF) index: chosen past a size, removal stays correct, adds are incremental."""

from __future__ import annotations

import numpy as np
import pytest

from mmsearch import index as index_mod
from mmsearch.index import VectorIndex, build_from_catalog, fits, new_faiss_index, open_index
from mmsearch.store import Catalog


def clustered(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, dim))
    v = centres[rng.integers(0, 20, n)] + 0.3 * rng.normal(size=(n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def ivf(vectors: np.ndarray, ids: np.ndarray) -> VectorIndex:
    idx = VectorIndex("image", vectors.shape[1], "m", "ivf", new_faiss_index(vectors.shape[1], "ivf", len(vectors)))
    idx.train(vectors)
    idx.add(ids, vectors)
    return idx


def test_choose_index_type_switches_at_threshold():
    assert index_mod.choose_index_type(index_mod.EXACT_MAX - 1) == "flat"
    assert index_mod.choose_index_type(index_mod.EXACT_MAX) == "ivf"


def test_ivf_finds_neighbours_and_never_returns_removed_ids():
    vectors = clustered(3000)
    ids = np.arange(10, 3010, dtype=np.int64)
    idx = ivf(vectors, ids)
    _, found = idx.search(vectors[:50], 10)
    assert (found[:, 0] == ids[:50]).mean() > 0.9  # each vector finds itself
    removed = ids[:1500]
    assert idx.remove(removed) == 1500
    assert idx.count == 1500
    _, found = idx.search(vectors[:200], 50)
    assert not set(found.ravel().tolist()) & set(removed.tolist())
    assert sorted(idx.ids().tolist()) == ids[1500:].tolist()


def test_ivf_round_trips_with_sidecar(tmp_path):
    vectors = clustered(2000)
    idx = ivf(vectors, np.arange(1, 2001, dtype=np.int64))
    idx.faiss_index.nprobe = 7
    idx.save(tmp_path / "images.faiss")
    loaded = VectorIndex.load(tmp_path / "images.faiss")
    assert loaded.index_type == "ivf" and loaded.count == 2000
    assert loaded.faiss_index.nprobe == 7
    assert loaded.sidecar()["nlist"] == idx.faiss_index.nlist


@pytest.fixture
def small_threshold(monkeypatch):
    monkeypatch.setattr(index_mod, "EXACT_MAX", 1000)


def fill(catalog: Catalog, vectors: np.ndarray, start: int = 0) -> list[int]:
    rows = [
        {"path": f"/p/{start + i}.jpg", "size": 1, "mtime_ns": 1, "content_hash": f"h{start + i}",
         "width": 1, "height": 1, "vector": v}
        for i, v in enumerate(vectors)
    ]
    return catalog.write_images(rows, [])


def test_catalog_past_threshold_builds_ivf_then_adds_incrementally(tmp_path, small_threshold):
    vectors = clustered(2600)
    with Catalog.open(tmp_path / "c.sqlite3") as catalog:
        fill(catalog, vectors[:500])
        path = tmp_path / "images.faiss"
        assert open_index(catalog, path, "image", 16, "m").index_type == "flat"
        fill(catalog, vectors[500:2000], start=500)
        idx = open_index(catalog, path, "image", 16, "m")
        assert idx.index_type == "ivf" and idx.count == 2000
        nlist = idx.faiss_index.nlist
        # an indexing run adds to the loaded index and saves it: no retraining
        new_ids = fill(catalog, vectors[2000:], start=2000)
        idx.add(np.array(new_ids), vectors[2000:])
        idx.generation = catalog.generation("image")
        idx.save(path)
        again = open_index(catalog, path, "image", 16, "m")
        assert again.count == 2600 and again.faiss_index.nlist == nlist
        assert fits(again, again.count)
        _, found = again.search(vectors[2000:2050], 1)
        assert (found[:, 0] == np.array(new_ids[:50])).mean() > 0.9


def test_build_from_catalog_ivf_holds_exactly_the_catalog(tmp_path, small_threshold):
    vectors = clustered(1500)
    with Catalog.open(tmp_path / "c.sqlite3") as catalog:
        ids = fill(catalog, vectors)
        catalog.write_images([], [], removed_ids=ids[:100])
        idx = build_from_catalog(catalog, "image", 16, "m")
        assert idx.index_type == "ivf"
        assert sorted(idx.ids().tolist()) == sorted(ids[100:])


def test_ivf_stores_float16_and_ivf_flat_float32_both_round_trip(tmp_path):
    vectors = clustered(2000)
    ids = np.arange(1, 2001, dtype=np.int64)
    for kind, storage in (("ivf", "float16"), ("ivf-flat", "float32")):
        idx = VectorIndex("image", 16, "m", kind, new_faiss_index(16, kind, len(vectors)))
        idx.train(vectors)
        idx.add(ids, vectors)
        assert idx.sidecar()["storage"] == storage
        idx.save(tmp_path / f"{kind}.faiss")
        loaded = VectorIndex.load(tmp_path / f"{kind}.faiss")
        assert loaded.sidecar()["storage"] == storage and loaded.index_type == kind
        scores, found = loaded.search(vectors[:20], 1)
        assert (found[:, 0] == ids[:20]).all()
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=2e-3)  # float16 costs ~1e-3 of a score, no more


def test_ivf_flat_index_saved_by_an_older_version_is_kept(tmp_path, small_threshold):
    """An index saved as IVFFlat under the name ``ivf`` still loads, searches and is not rebuilt."""
    vectors = clustered(1500)
    with Catalog.open(tmp_path / "c.sqlite3") as catalog:
        ids = fill(catalog, vectors)
        old = VectorIndex("image", 16, "m", "ivf", new_faiss_index(16, "ivf-flat", len(vectors)))
        old.train(vectors)
        old.add(np.array(ids), vectors)
        old.generation = catalog.generation("image")
        path = tmp_path / "images.faiss"
        old.save(path)
        again = open_index(catalog, path, "image", 16, "m", on_rebuild=lambda _: pytest.fail("rebuilt"))
        assert again.sidecar()["storage"] == "float32" and again.count == 1500
