"""The relevance cutoff: a calibrated ``relevance`` on every hit, ``--cutoff auto|NUMBER``, "no good match"."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.errors import UsageError
from mmsearch.relevance import AUTO_CUTOFF, apply_cutoff, parse_cutoff, relevance
from mmsearch.search import Hit

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_parse_cutoff():
    assert parse_cutoff(None) is None
    assert parse_cutoff("auto") == parse_cutoff("AUTO") == AUTO_CUTOFF
    assert parse_cutoff("2.5") == 2.5 and parse_cutoff("-1") == -1.0
    for bad in ("high", "nan", "inf", ""):
        with pytest.raises(UsageError, match="^cutoff must be"):
            parse_cutoff(bad)


def test_relevance_is_a_z_score_against_the_query_own_distribution():
    rng = np.random.default_rng(1)
    sample = rng.normal(size=(500, 16)).astype(np.float32)
    sample /= np.linalg.norm(sample, axis=1, keepdims=True)
    query = sample[7]
    spread = sample @ query
    values = relevance(np.array([1.0, float(spread.mean())]), query, sample)
    assert values[0] == pytest.approx((1.0 - spread.mean()) / spread.std(), rel=1e-4)
    assert values[1] == pytest.approx(0.0, abs=1e-5)


def test_relevance_of_an_empty_or_uniform_collection_is_finite():
    assert relevance(np.array([0.5]), np.ones(4, dtype=np.float32), np.zeros((0, 4), np.float32))[0] == 0.0
    same = np.tile(np.array([[1, 0, 0, 0]], np.float32), (5, 1))
    assert np.isfinite(relevance(np.array([1.0]), same[0], same)).all()


def test_apply_cutoff_keeps_passing_hits_and_ranks_them_anew():
    hits = [Hit(i + 1, 0.5, i, "image", path=f"/{i}", extra={"relevance": r}) for i, r in enumerate([5.0, 1.0, 3.0])]
    assert apply_cutoff(list(hits), None) == hits
    kept = apply_cutoff(list(hits), 2.0)
    assert [(h.id, h.rank) for h in kept] == [(0, 1), (2, 2)]
    assert apply_cutoff(list(hits), 9.0) == []


def test_search_json_has_relevance_and_cutoff_filters(base, photo_dir):
    assert run(*base, "index", photo_dir, "-q").exit_code == 0
    hits = [json.loads(x) for x in run(*base, "search", "--image", photo_dir / "red.jpg", "--json").stdout.splitlines()]
    assert len(hits) == 6 and all(isinstance(h["relevance"], float) for h in hits)
    # the query image itself stands out most from the query's own score distribution
    assert hits[0]["path"] == str(photo_dir / "red.jpg")
    assert hits[0]["relevance"] == max(h["relevance"] for h in hits) > 0
    middle = sorted(h["relevance"] for h in hits)[3]
    cut = [json.loads(x) for x in run(*base, "search", "--image", photo_dir / "red.jpg", "--json", "--cutoff", middle).stdout.splitlines()]
    assert [h["id"] for h in cut] == [h["id"] for h in hits if h["relevance"] >= middle]
    assert [h["rank"] for h in cut] == list(range(1, len(cut) + 1)) and 0 < len(cut) < 6
    assert all(h["score"] == pytest.approx(next(o["score"] for o in hits if o["id"] == h["id"])) for h in cut)


@pytest.mark.parametrize("extra", [["--json"], []])
def test_nothing_passes_is_no_good_match_on_stderr_and_exit_0(base, photo_dir, extra):
    run(*base, "index", photo_dir, "-q")
    result = run(*base, "search", "a red thing", "--cutoff", "1000", *extra)
    assert result.exit_code == 0
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == ["no good match"]


def test_cutoff_auto_and_bad_value(base, photo_dir):
    run(*base, "index", photo_dir, "-q")
    auto = run(*base, "search", "--image", photo_dir / "red.jpg", "--json", "--cutoff", "auto")
    assert auto.exit_code == 0
    assert all(json.loads(x)["relevance"] >= AUTO_CUTOFF for x in auto.stdout.splitlines())
    bad = run(*base, "search", "cat", "--cutoff", "high")
    assert bad.exit_code == 2
    assert bad.stderr.strip().splitlines() == ["error: --cutoff must be 'auto' or a number, got 'high'"]


def test_texts_get_relevance_too(base, photo_dir, tmp_path):
    corpus = tmp_path / "caps.txt"
    corpus.write_text("a red thing\na green thing\na blue thing\n")
    run(*base, "add-texts", corpus, "-q")
    hits = [json.loads(x) for x in run(*base, "search", "a green thing", "--texts", "--json").stdout.splitlines()]
    assert hits[0]["text"] == "a green thing" and hits[0]["relevance"] == max(h["relevance"] for h in hits)


def test_background_sample_is_fixed_and_bounded(tmp_path, monkeypatch):
    import mmsearch.relevance as rel
    from mmsearch.decode import content_hash
    from mmsearch.home import Home
    from mmsearch.settings import resolve

    with Home.open(resolve(home=tmp_path / "h", model="local-dir:/nowhere")) as home:
        home.catalog.set_meta({"model": home.spec.canonical, "dim": "4"})
        vectors = np.eye(4, dtype=np.float32)[np.arange(50) % 4]
        home.catalog.write_images([
            {"path": f"/p/{i}", "size": 0, "mtime_ns": 0, "content_hash": content_hash(bytes([i])),
             "width": 1, "height": 1, "vector": vectors[i]} for i in range(50)
        ], [])
        ids = home.catalog.sample_ids("image", 20)
        assert len(ids) == 20 and list(ids) == sorted(set(ids.tolist())) and set(ids.tolist()) <= set(range(1, 51))
        assert (home.catalog.sample_ids("image", 20) == ids).all()
        assert len(home.catalog.sample_ids("image", 100)) == 50
        home.catalog.write_images([], [], removed_ids=list(range(1, 41)))  # gaps: only ids 41..50 remain
        assert home.catalog.sample_ids("image", 5).tolist() == sorted(home.catalog.sample_ids("image", 5).tolist())
        assert set(home.catalog.sample_ids("image", 5).tolist()) <= set(range(41, 51))
        assert home.catalog.sample_ids("image", 20).tolist() == list(range(41, 51))
        monkeypatch.setattr(rel, "BACKGROUND_SIZE", 5)
        assert rel.background(home, "image").shape == (5, 4)
