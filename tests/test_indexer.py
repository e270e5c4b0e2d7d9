"""Incremental indexing: unchanged, changed, renamed, copied, removed, corrupt."""

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mmsearch.errors import ModelMismatchError
from mmsearch.home import Home
from mmsearch.indexer import index_paths
from mmsearch.settings import resolve
from tests.conftest import COLOURS, make_image


def _home(home: Path, model: Path | None, **kw) -> Home:
    return Home.open(resolve(home=home, model=str(model) if model else None, workers=2, **kw))


def _faiss_ids(h: Home) -> list[int]:
    return sorted(int(i) for i in h.index("image").ids())


def test_first_run_indexes_everything(photo_dir, home, tiny_model, catalog_url):
    with _home(home, tiny_model, catalog=catalog_url) as h:
        report = index_paths(h, [photo_dir], progress=False)
        assert (report.added, report.skipped, report.removed) == (6, 0, 0)
        assert h.catalog.count("image") == 6
        assert _faiss_ids(h) == sorted(s.id for s in h.catalog.image_states().values())
        assert h.recorded_model == f"local-dir:{tiny_model.resolve()}" and h.dim == 32


def test_unchanged_files_are_not_read_again(photo_dir, home, tiny_model, monkeypatch):
    with _home(home, tiny_model) as h:
        index_paths(h, [photo_dir], progress=False)
    import mmsearch.indexer as indexer

    def fail(*a, **k):
        raise AssertionError("an unchanged run must not read or encode files")

    monkeypatch.setattr(indexer, "_encode_files", fail)
    with _home(home, None) as h:
        report = index_paths(h, [photo_dir], progress=False)
        assert h._encoder is None  # the model was never loaded
    assert (report.added, report.updated, report.unchanged, report.removed) == (0, 0, 6, 0)


def test_rename_and_copy_reuse_vectors_removal_drops(photo_dir, home, tiny_model, catalog_url):
    with _home(home, tiny_model, catalog=catalog_url) as h:
        index_paths(h, [photo_dir], progress=False)
        before = {Path(p).name: s for p, s in h.catalog.image_states().items()}
        red_vec = h.catalog.vectors("image", [before["red.jpg"].id], 32)[before["red.jpg"].id]
    os.rename(photo_dir / "red.jpg", photo_dir / "renamed red.jpg")
    shutil.copy(photo_dir / "green.png", photo_dir / "copy of green.png")
    os.remove(photo_dir / "white.bmp")
    with _home(home, tiny_model, catalog=catalog_url) as h:
        report = index_paths(h, [photo_dir], progress=False)
        assert (report.added, report.removed, report.reused, report.unchanged) == (2, 2, 2, 4)
        states = {Path(p).name: s for p, s in h.catalog.image_states().items()}
        assert "red.jpg" not in states and "white.bmp" not in states
        new_vec = h.catalog.vectors("image", [states["renamed red.jpg"].id], 32)[states["renamed red.jpg"].id]
        np.testing.assert_array_equal(new_vec, red_vec)
        assert _faiss_ids(h) == sorted(s.id for s in states.values())


def test_content_moved_to_a_new_file_while_its_old_file_changed(photo_dir, home, tiny_model, catalog_url):
    """red.jpg's content moves to "moved red.jpg" and red.jpg gets new content, in one run:
    the catalog's copy of that content is overwritten while the run goes, so it cannot be
    reused, and the new file is encoded instead of being dropped."""
    with _home(home, tiny_model, catalog=catalog_url) as h:
        index_paths(h, [photo_dir], progress=False)
        old = h.catalog.image_states()[str(photo_dir / "red.jpg")]
        red_vec = h.catalog.vectors("image", [old.id], 32)[old.id]
    shutil.copy(photo_dir / "red.jpg", photo_dir / "~moved red.jpg")  # walked after red.jpg
    make_image(photo_dir / "red.jpg", COLOURS["blue"], size=(80, 60))
    os.utime(photo_dir / "red.jpg", ns=(old.mtime_ns + 10**9, old.mtime_ns + 10**9))
    with _home(home, tiny_model, batch_size=1, catalog=catalog_url) as h:
        report = index_paths(h, [photo_dir], progress=False)
        assert (report.updated, report.added, report.skipped) == (1, 1, 0)
        states = {Path(p).name: s for p, s in h.catalog.image_states().items()}
        moved = states["~moved red.jpg"]
        assert moved.content_hash == old.content_hash and states["red.jpg"].content_hash != old.content_hash
        np.testing.assert_allclose(h.catalog.vectors("image", [moved.id], 32)[moved.id], red_vec, atol=1e-6)
        assert _faiss_ids(h) == sorted(s.id for s in states.values())


def test_changed_file_is_updated_in_place(photo_dir, home, tiny_model, catalog_url):
    with _home(home, tiny_model, catalog=catalog_url) as h:
        index_paths(h, [photo_dir], progress=False)
        old = h.catalog.image_states()[str(photo_dir / "red.jpg")]
    make_image(photo_dir / "red.jpg", COLOURS["blue"], size=(80, 60))
    os.utime(photo_dir / "red.jpg", ns=(old.mtime_ns + 10**9, old.mtime_ns + 10**9))
    with _home(home, tiny_model, catalog=catalog_url) as h:
        report = index_paths(h, [photo_dir], progress=False)
        assert (report.updated, report.added, report.unchanged) == (1, 0, 5)
        new = h.catalog.image_states()[str(photo_dir / "red.jpg")]
        assert new.id == old.id and new.content_hash != old.content_hash
        assert h.catalog.count("image") == 6 and len(_faiss_ids(h)) == 6


def test_other_roots_are_left_alone(tmp_path, home, tiny_model):
    make_image(tmp_path / "a" / "1.jpg")
    make_image(tmp_path / "b" / "2.jpg")
    with _home(home, tiny_model) as h:
        index_paths(h, [tmp_path / "a"], progress=False)
        report = index_paths(h, [tmp_path / "b"], progress=False)
        assert report.removed == 0 and h.catalog.count("image") == 2


def test_corrupt_files_are_skipped_and_counted(photo_dir, home, tiny_model, catalog_url):
    (photo_dir / "zero.jpg").write_bytes(b"")
    (photo_dir / "fake.png").write_text("not a png")
    data = (photo_dir / "green.png").read_bytes()
    (photo_dir / "truncated.png").write_bytes(data[: len(data) // 3])
    seen = []
    with _home(home, tiny_model, catalog=catalog_url) as h:
        report = index_paths(h, [photo_dir], progress=False, on_skip=lambda p, r: seen.append(Path(p).name))
    assert report.added == 6 and report.skipped == 3
    assert sorted(seen) == ["fake.png", "truncated.png", "zero.jpg"]


def test_other_model_on_existing_home_is_refused(photo_dir, home, tiny_model, other_tiny_model):
    with _home(home, tiny_model) as h:
        index_paths(h, [photo_dir], progress=False)
    with pytest.raises(ModelMismatchError, match="was indexed with model"):
        _home(home, other_tiny_model)


def test_small_batches_give_the_same_vectors(photo_dir, tmp_path, tiny_model):
    results = []
    for batch, workers in ((1, 0), (4, 3)):
        with Home.open(resolve(home=tmp_path / f"h{batch}", model=str(tiny_model), batch_size=batch, workers=workers)) as h:
            index_paths(h, [photo_dir], progress=False)
            states = h.catalog.image_states()
            vecs = h.catalog.vectors("image", [s.id for s in states.values()], 32)
            results.append({p: vecs[s.id] for p, s in states.items()})
    assert results[0].keys() == results[1].keys()
    for path in results[0]:
        np.testing.assert_allclose(results[0][path], results[1][path], atol=1e-5)


def test_copies_met_in_one_run_are_encoded_once(tmp_path, home, tiny_model):
    make_image(tmp_path / "pics" / "a.jpg", COLOURS["red"])
    for i in range(3):
        shutil.copy(tmp_path / "pics" / "a.jpg", tmp_path / "pics" / f"copy{i}.jpg")
    with _home(home, tiny_model, batch_size=2) as h:
        report = index_paths(h, [tmp_path / "pics"], progress=False)
        assert report.added == 4 and report.skipped == 0
        assert len(_faiss_ids(h)) == 4


def test_cpu_lanes_keep_walk_order_across_skipped_and_reused_files(tmp_path, tiny_model):
    """Lanes finish out of order; ids still follow the walk, with bad files and copies in the batches."""
    pics = tmp_path / "pics"
    for i in range(7):
        make_image(pics / f"p{i}.png", list(COLOURS.values())[i % len(COLOURS)], size=(40 + i, 30))
    (pics / "p2b-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(pics / "p1.png", pics / "p5b-copy.png")
    results = {}
    for workers in (0, 2):
        with Home.open(resolve(home=tmp_path / f"h{workers}", model=str(tiny_model), batch_size=3, workers=workers)) as h:
            report = index_paths(h, [pics], progress=False)
            assert (report.added, report.skipped) == (8, 1)
            states = h.catalog.image_states()
            vecs = h.catalog.vectors("image", [s.id for s in states.values()], 32)
            results[workers] = [(Path(p).name, vecs[s.id]) for p, s in sorted(states.items(), key=lambda kv: kv[1].id)]
    assert [name for name, _ in results[2]] == [name for name, _ in results[0]]
    for (_, a), (_, b) in zip(results[0], results[2]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_cpu_lanes_give_torch_its_thread_count_back(photo_dir, home, tiny_model):
    import torch

    before = torch.get_num_threads()
    with _home(home, tiny_model) as h:
        index_paths(h, [photo_dir], progress=False)
    assert torch.get_num_threads() == before


def test_run_that_outgrows_its_index_type_builds_the_next_tier_at_the_end(photo_dir, home, tiny_model, monkeypatch):
    """A first run over a large collection does not grow a flat index past its tier in memory."""
    import mmsearch.index as index_mod

    monkeypatch.setattr(index_mod, "EXACT_MAX", 3)
    monkeypatch.setattr(index_mod, "ivf_cells", lambda count: 2)  # cells six vectors can train
    built = []
    real = index_mod.build_from_catalog
    monkeypatch.setattr(index_mod, "build_from_catalog", lambda c, *a, **k: built.append(c.count("image")) or real(c, *a, **k))
    with _home(home, tiny_model, batch_size=2) as h:
        report = index_paths(h, [photo_dir], progress=False)
        assert report.added == 6 and built == [0, 6]  # the empty one it started with, then once at the end
        meta = __import__("json").loads((home / "images.faiss.json").read_text())
        assert meta["index_type"] == "ivf" and meta["count"] == 6
        assert _faiss_ids(h) == sorted(s.id for s in h.catalog.image_states().values())
