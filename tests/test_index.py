"""FAISS index: exact search, sidecar, atomic save, rebuild from the catalog."""

import json
from pathlib import Path

import numpy as np

from mmsearch.index import VectorIndex, open_index, sidecar_path
from mmsearch.store import Catalog


def _unit(rng, n, dim=8):
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_exact_inner_product_search():
    rng = np.random.default_rng(0)
    vectors = _unit(rng, 200)
    index = VectorIndex.empty("image", 8, "m")
    ids = np.arange(1000, 1200)
    index.add(ids, vectors)
    scores, found = index.search(vectors[17], 5)
    assert found[0][0] == 1017 and abs(scores[0][0] - 1.0) < 1e-5
    expected = np.argsort(-(vectors @ vectors[17]))[:5] + 1000
    assert list(found[0]) == list(expected)
    assert index.remove(np.array([1017])) == 1
    assert 1017 not in index.search(vectors[17], 5)[1][0]


def test_save_load_round_trip_with_sidecar(tmp_path: Path):
    index = VectorIndex.empty("text", 8, "model-x")
    index.add(np.array([5, 9]), _unit(np.random.default_rng(1), 2))
    index.generation = 7
    path = tmp_path / "texts.faiss"
    index.save(path)
    meta = json.loads(sidecar_path(path).read_text())
    assert meta == {"kind": "text", "dim": 8, "model": "model-x", "index_type": "flat", "count": 2, "generation": 7}
    loaded = VectorIndex.load(path)
    assert sorted(loaded.ids()) == [5, 9] and loaded.generation == 7
    assert not list(tmp_path.glob("*.tmp"))  # no temp files left behind


def test_stale_or_broken_index_is_rebuilt_from_catalog(tmp_path: Path):
    rng = np.random.default_rng(2)
    vectors = _unit(rng, 3)
    with Catalog.open(tmp_path / "c.sqlite3") as catalog:
        rows = [
            {"path": f"/p/{i}", "size": 1, "mtime_ns": 1, "content_hash": str(i), "width": 1, "height": 1,
             "vector": v}
            for i, v in enumerate(vectors)
        ]
        ids = catalog.write_images(rows, [])
        path = tmp_path / "images.faiss"
        first = open_index(catalog, path, "image", 8, "m")
        assert sorted(first.ids()) == sorted(ids) and path.exists()
        # the catalog moves on without the index (a crash before the save)
        catalog.write_images([], [], removed_ids=[ids[0]])
        second = open_index(catalog, path, "image", 8, "m")
        assert sorted(second.ids()) == sorted(ids[1:])
        # a garbage file is rebuilt, not trusted
        path.write_bytes(b"garbage")
        third = open_index(catalog, path, "image", 8, "m")
        assert sorted(third.ids()) == sorted(ids[1:])
