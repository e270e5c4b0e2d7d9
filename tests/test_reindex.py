"""mmsearch --model NEW reindex: a home switches models without losing its catalog.

Two tiny random models of different dimensions (32 and 24) stand in for an
old and a new model; a kill -9 at several points of a run must leave a home
that answers with the old model, and the next run must finish the switch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import faults
from conftest import make_image
from mmsearch import Library
from mmsearch.check import check_home
from mmsearch.cli import app
from mmsearch.encode import load_encoder
from mmsearch.index import VectorIndex
from mmsearch.reindex import reindex
from mmsearch.schema import StagedRow
from mmsearch.settings import resolve
from mmsearch.store import Catalog

runner = CliRunner()


def cli(*args: str) -> object:
    return runner.invoke(app, list(args), catch_exceptions=False)


def picture(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    return make_image(path, tuple(int(c) for c in rng.integers(0, 256, 3)), (40 + seed % 5, 32))


@pytest.fixture(scope="module")
def other_rerank_model(other_tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 24-d tiny model plus an untrained re-ranker: another model than the home's, with one."""
    import torch

    from mmsearch.rerank import CrossAttentionScorer, save_scorer

    folder = tmp_path_factory.mktemp("models") / "other-rerank"
    shutil.copytree(other_tiny_model, folder)
    torch.manual_seed(4)
    save_scorer(CrossAttentionScorer(24), folder)
    return folder


@pytest.fixture
def indexed(tmp_path: Path, tiny_model: Path) -> tuple[Path, Path]:
    """A home (tiny model, 32-d) holding 8 pictures (two of them copies) and 5 texts; (home, photos)."""
    home, photos = tmp_path / "home", tmp_path / "photos"
    for i in range(6):
        picture(photos / f"p{i}.png", i)
    (photos / "copies").mkdir()
    for i in (0, 1):
        (photos / "copies" / f"p{i}.png").write_bytes((photos / f"p{i}.png").read_bytes())
    corpus = tmp_path / "texts.txt"
    corpus.write_text("a red square\na green field\nthe blue sea\na yellow car\nblack night\n")
    base = ["--home", str(home), "--model", str(tiny_model), "--batch-size", "2", "--workers", "0"]
    assert cli(*base, "index", "-q", str(photos)).exit_code == 0
    assert cli(*base, "add-texts", "-q", str(corpus)).exit_code == 0
    return home, photos


def rows(home: Path) -> dict[str, tuple[int, bytes]]:
    """Path or text key -> (id, vector blob) of every catalogued item."""
    with Catalog.open(home / "catalog.sqlite3", create=False) as catalog:
        with catalog.engine.connect() as conn:
            out = {p: (i, v) for i, p, v in conn.exec_driver_sql("SELECT id, path, vector FROM images")}
            out.update({k: (i, v) for i, k, v in conn.exec_driver_sql("SELECT id, key, vector FROM texts")})
    return out


def meta(home: Path) -> dict[str, str]:
    with Catalog.open(home / "catalog.sqlite3", create=False) as catalog:
        with catalog.engine.connect() as conn:
            return dict(conn.exec_driver_sql("SELECT key, value FROM meta").all())


def staged_count(home: Path) -> int:
    with Catalog.open(home / "catalog.sqlite3", create=False) as catalog:
        with catalog.engine.connect() as conn:
            return int(conn.exec_driver_sql(f"SELECT count(*) FROM {StagedRow.__tablename__}").scalar())


def search_paths(home: Path, *extra: str) -> tuple[int, list[str]]:
    """Exit code and result paths of a search on the home without --model (the home's own model)."""
    result = runner.invoke(app, ["--home", str(home), *extra, "search", "anything", "-k", "100", "--json"])
    return result.exit_code, [json.loads(line)["path"] for line in result.stdout.splitlines()]


def assert_on_model(home: Path, model: Path, dim: int) -> None:
    """The home answers with ``model``: meta, FAISS sidecars, and every vector is that model's."""
    info = meta(home)
    assert info["model"] == f"local-dir:{model}" and info["dim"] == str(dim)
    assert not any(key.startswith("reindex_") for key in info)
    report = check_home(resolve(home=home))
    assert report.ok and report.findings == [], report.findings
    for kind in ("image", "text"):
        index = VectorIndex.load(home / f"{kind}s.faiss")
        assert (index.model, index.dim) == (f"local-dir:{model}", dim)
    assert staged_count(home) == 0


def test_reindex_switches_model_keeping_ids(indexed: tuple[Path, Path], tiny_model: Path, other_tiny_model: Path):
    home, photos = indexed
    before = rows(home)
    result = cli("--home", str(home), "--model", str(other_tiny_model), "--batch-size", "2", "reindex", "-q", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["switched"] and report["model"] == f"local-dir:{other_tiny_model}"
    assert report["previous_model"] == f"local-dir:{tiny_model}"
    assert report["images"] + report["reused"] == 8 and report["texts"] == 5
    assert report["resumed"] == 0 and report["removed"] == 0 and report["seconds"] >= 0
    assert_on_model(home, other_tiny_model, 24)
    after = rows(home)
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}  # same ids
    # every vector is the new model's embedding of the same file or text
    encoder = load_encoder(f"local-dir:{other_tiny_model}", "cpu")
    with Library.open(tmp := home.parent / "fresh", model=str(other_tiny_model)) as fresh:
        fresh.add_images([photos])
        fresh.add_texts(home.parent / "texts.txt")
    fresh_rows = rows(tmp)
    assert set(fresh_rows) == set(after)
    for key, (_, blob) in after.items():
        assert np.frombuffer(blob, "<f2").shape == (encoder.dim,)
        assert np.allclose(np.frombuffer(blob, "<f2"), np.frombuffer(fresh_rows[key][1], "<f2"), atol=2e-3), key
    # the home now answers with the new model, and the old one is a mismatch
    code, paths = search_paths(home)
    assert code == 0 and len(paths) == 8
    old = runner.invoke(app, ["--home", str(home), "--model", str(tiny_model), "search", "red"])
    assert old.exit_code == 1 and "indexed with model" in old.output
    again = cli("--home", str(home), "--model", str(other_tiny_model), "reindex", "-q")
    assert again.exit_code == 0 and "nothing to do" in again.stdout


def test_search_keeps_the_old_model_during_a_run(indexed: tuple[Path, Path], tiny_model: Path, other_tiny_model: Path):
    home, _ = indexed
    held = Library.open(home)  # a long-lived holder (the server's), opened before the run
    assert held.model == f"local-dir:{tiny_model}" and len(held.search("red", k=3)) == 3
    seen: list[tuple[str, int]] = []

    def between_batches(done: int, total: int) -> None:
        with Library.open(home, create=False) as lib:  # a new search while the run goes on
            hits = lib.search("red", k=20)
            seen.append((lib.model, len(hits)))
        assert held.search("red", k=3) and held.model == f"local-dir:{tiny_model}"

    settings = resolve(home=home, model=str(other_tiny_model), batch_size=2, workers=0)
    report = reindex(settings, progress=between_batches)
    assert report.switched
    assert len(seen) >= 4 and all(s == (f"local-dir:{tiny_model}", 8) for s in seen)
    # the holder takes up the new model at its next search
    hits = held.search("red", k=20)
    assert held.model == f"local-dir:{other_tiny_model}" and len(hits) == 8
    assert held.encoder().dim == 24
    held.close()


def test_library_pinned_to_the_old_model_gets_one_error(indexed, tiny_model, other_tiny_model):
    from mmsearch.errors import ModelMismatchError

    home, _ = indexed
    with Library.open(home, model=str(tiny_model)) as pinned:
        assert pinned.search("red", k=2)
        reindex(resolve(home=home, model=str(other_tiny_model)), progress=False)
        with pytest.raises(ModelMismatchError) as info:
            pinned.search("red", k=2)
    assert "indexed with model" in str(info.value) and "\n" not in str(info.value)


# Points of a run (5 texts in one batch, then 8 images in batches of 2): after the
# texts and two image batches were staged, inside the switch's transaction, and
# after its commit (before the FAISS files and re-ranker tokens follow).
@pytest.mark.parametrize("fault", ["stage:3", "in-switch", "after-switch"])
def test_kill_during_reindex_then_resume(fault: str, indexed, tiny_model, other_tiny_model):
    home, photos = indexed
    before = rows(home)
    base = ["--home", str(home), "--model", str(other_tiny_model), "--batch-size", "2", "--workers", "0"]
    child = faults.start([*base, "reindex", "-q"], fault)
    child.join(120)
    assert child.exitcode == -signal.SIGKILL

    switched = fault == "after-switch"
    code, paths = search_paths(home)  # the home answers, without --model, at once
    assert code == 0 and sorted(paths) == sorted(str(p) for p in photos.rglob("*.png"))
    if switched:
        assert meta(home)["model"] == f"local-dir:{other_tiny_model}"
    else:
        assert meta(home)["model"] == f"local-dir:{tiny_model}" and rows(home) == before
        assert check_home(resolve(home=home)).ok
    staged = staged_count(home)
    if fault == "stage:3":  # a picture the killed run had staged is deleted before the next run
        gone = photos / "copies" / "p0.png"
        with Catalog.open(home / "catalog.sqlite3", create=False) as catalog, catalog.engine.connect() as conn:
            ids = {i for (i,) in conn.exec_driver_sql("SELECT id FROM staged_vectors WHERE kind = 'image'")}
        assert before[str(gone)][0] in ids
        gone.unlink()
        del before[str(gone)]

    result = cli(*base, "reindex", "-q", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.splitlines()[-1])
    if fault == "stage:3":  # the texts and two batches of images were staged
        assert report["switched"] and report["resumed"] == staged and 5 + 2 <= staged < 13
        assert report["images"] + report["reused"] + report["resumed"] == 13 and report["texts"] == 0
        assert report["removed"] == 1
    elif fault == "in-switch":  # all was staged, the switch rolled back
        assert report["switched"] and report["resumed"] == staged == 13 and report["images"] == 0
    else:
        assert not report["switched"]  # it had switched; this run finished what follows
    assert_on_model(home, other_tiny_model, 24)
    assert {k: v[0] for k, v in rows(home).items()} == {k: v[0] for k, v in before.items()}


def test_a_run_for_another_model_starts_afresh(indexed, tiny_model, other_tiny_model, other_rerank_model):
    home, _ = indexed
    base = ["--home", str(home), "--batch-size", "2", "--workers", "0"]
    child = faults.start([*base, "--model", str(other_tiny_model), "reindex", "-q"], "stage:2")
    child.join(120)
    assert child.exitcode == -signal.SIGKILL and staged_count(home) > 0
    # another model spec than the one staged for (here the same encoder plus a re-ranker): it starts afresh
    result = cli(*base, "--model", str(other_rerank_model), "reindex", "-q", "--json")
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["switched"] and report["resumed"] == 0
    assert_on_model(home, other_rerank_model, 24)
    # the new model has a re-ranker: its tokens were made during the run
    tokens = json.loads((home / "rerank" / "tokens.json").read_text())
    assert tokens["model"] == f"local-dir:{other_rerank_model}"
    assert len((home / "rerank" / "tokens.hashes").read_text().split()) == 6  # one per distinct picture
    assert not (home / "reindex").exists()
    reranked = runner.invoke(app, ["--home", str(home), "search", "red", "--rerank", "--json"])
    assert reranked.exit_code == 0 and len(reranked.stdout.splitlines()) == 8
    # and back to a model without one: the tokens go
    assert cli(*base, "--model", str(tiny_model), "reindex", "-q").exit_code == 0
    assert not (home / "rerank").exists()
    assert_on_model(home, tiny_model, 32)


def test_vanished_and_broken_files_are_removed(indexed, other_tiny_model):
    home, photos = indexed
    (photos / "p2.png").unlink()
    (photos / "p3.png").write_bytes(b"no longer a picture")
    picture(photos / "p4.png", 40)  # changed since it was indexed: embedded as it is now
    result = cli("--home", str(home), "--model", str(other_tiny_model), "reindex", "-q", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["removed"] == 2 and report["skipped"] == 1
    assert "skipped" in result.stderr and "p3.png" in result.stderr
    kept = rows(home)
    assert str(photos / "p2.png") not in kept and str(photos / "p3.png") not in kept
    assert_on_model(home, other_tiny_model, 24)
    # p4's row describes the file as it is now: `index` finds nothing to do
    again = cli("--home", str(home), "index", "-q", "--json", str(photos))
    counts = json.loads(again.stdout.splitlines()[-1])
    assert counts["updated"] == 0 and counts["added"] == 0 and counts["removed"] == 0


def test_unreadable_files_stop_the_switch_until_dropped(indexed, tiny_model, other_tiny_model):
    home, photos = indexed
    shutil.rmtree(photos / "copies")  # a whole folder not there: a disk not mounted?
    before = rows(home)
    base = ["--home", str(home), "--model", str(other_tiny_model)]
    result = runner.invoke(app, [*base, "reindex", "-q"])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot be read now" in errors[0] and "--drop-unreadable" in errors[0]
    assert "copies/p1.png" in errors[0]
    assert rows(home) == before and meta(home)["model"] == f"local-dir:{tiny_model}"
    assert staged_count(home) == 6 + 5  # what could be read is kept for the next run
    result = cli(*base, "reindex", "-q", "--json", "--drop-unreadable")
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["removed"] == 2 and report["resumed"] == 11 and report["switched"]
    assert_on_model(home, other_tiny_model, 24)


def test_reindex_needs_a_model_and_an_indexed_home(tmp_path: Path, tiny_model: Path):
    result = runner.invoke(app, ["--home", str(tmp_path / "h"), "reindex"])
    assert result.exit_code == 2 and "--model" in result.output
    result = runner.invoke(app, ["--home", str(tmp_path / "h"), "--model", str(tiny_model), "reindex"])
    assert result.exit_code == 1 and "no catalog" in result.output
    assert not os.path.exists(tmp_path / "h" / "catalog.sqlite3")


def test_resume_after_the_collection_changed(indexed, tiny_model, other_tiny_model):
    home, photos = indexed
    base = ["--home", str(home), "--batch-size", "2", "--workers", "0"]
    child = faults.start([*base, "--model", str(other_tiny_model), "reindex", "-q"], "stage:2")
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    status = json.loads(cli(*base, "status", "--json").stdout)
    assert status["model"] == f"local-dir:{tiny_model}"
    assert status["reindex"]["model"] == f"local-dir:{other_tiny_model}" and status["reindex"]["staged"] >= 5
    # meanwhile the home is used as before: a picture added, one deleted, one changed, a text changed
    picture(photos / "new.png", 70)
    (photos / "copies" / "p0.png").unlink()
    picture(photos / "copies" / "p1.png", 71)
    corpus = home.parent / "more.jsonl"
    corpus.write_text(json.dumps({"id": "t1", "text": "first"}) + "\n")
    assert cli(*base, "--model", str(tiny_model), "index", "-q", str(photos)).exit_code == 0
    assert cli(*base, "add-texts", "-q", str(corpus)).exit_code == 0
    corpus.write_text(json.dumps({"id": "t1", "text": "second"}) + "\n")
    assert cli(*base, "add-texts", "-q", str(corpus)).exit_code == 0
    result = cli(*base, "--model", str(other_tiny_model), "reindex", "-q", "--json")
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["switched"] and report["texts"] >= 1
    assert_on_model(home, other_tiny_model, 24)
    # every vector is the new model's embedding of what the catalog holds now
    with Library.open(fresh := home.parent / "fresh", model=str(other_tiny_model)) as lib:
        lib.add_images([photos])
        lib.add_texts(home.parent / "texts.txt")
        lib.add_texts(corpus)
    now, expected = rows(home), rows(fresh)
    assert set(now) == set(expected)
    for key in now:
        assert np.allclose(np.frombuffer(now[key][1], "<f2"), np.frombuffer(expected[key][1], "<f2"), atol=2e-3), key


def test_a_home_opened_before_the_switch_refuses_the_new_vectors(indexed, other_tiny_model):
    from mmsearch.errors import ModelChangedError
    from mmsearch.home import Home

    home, _ = indexed
    with Home.open(resolve(home=home)) as opened:  # a search in flight when the switch commits
        assert opened.dim == 32 and opened.index("image").count == 8
        reindex(resolve(home=home, model=str(other_tiny_model)), progress=False)
        for read in (lambda: opened.dim, lambda: opened.index("image")):
            with pytest.raises(ModelChangedError) as info:
                read()
            assert "switched to model" in str(info.value) and "\n" not in str(info.value)
    with Home.open(resolve(home=home)) as reopened:
        assert reopened.dim == 24 and reopened.index("image").count == 8


def test_a_running_server_answers_with_the_old_model_then_the_new(indexed, tiny_model, other_tiny_model):
    from fastapi.testclient import TestClient

    from mmsearch.server import create_app

    home, _ = indexed
    with Library.open(home, create=False) as library, TestClient(create_app(library)) as client:
        def served() -> tuple[str, int]:
            response = client.get("/api/search", params={"q": "red", "k": 20})
            assert response.status_code == 200, response.text
            return client.get("/api/status").json()["model"], len(response.json()["results"])

        assert served() == (f"local-dir:{tiny_model}", 8)
        during: list[tuple[str, int]] = []
        reindex(resolve(home=home, model=str(other_tiny_model), batch_size=2, workers=0),
                progress=lambda done, total: during.append(served()))
        assert during and set(during) == {(f"local-dir:{tiny_model}", 8)}
        assert served() == (f"local-dir:{other_tiny_model}", 8)


def test_reindex_to_the_current_model_abandons_an_unfinished_switch(indexed, tiny_model, other_tiny_model):
    home, _ = indexed
    before = rows(home)
    base = ["--home", str(home), "--batch-size", "2", "--workers", "0"]
    child = faults.start([*base, "--model", str(other_tiny_model), "reindex", "-q"], "stage:2")
    child.join(120)
    assert child.exitcode == -signal.SIGKILL and staged_count(home) > 0
    result = cli(*base, "--model", str(tiny_model), "reindex", "--json")
    assert json.loads(result.stdout.splitlines()[-1])["switched"] is False
    assert staged_count(home) == 0 and "reindex" not in json.loads(cli(*base, "status", "--json").stdout)
    assert rows(home) == before
    assert_on_model(home, tiny_model, 32)


def test_a_writer_opened_before_the_switch_writes_nothing(indexed, tiny_model, other_tiny_model):
    from mmsearch.errors import ModelChangedError
    from mmsearch.home import Home
    from mmsearch.indexer import index_paths
    from mmsearch.texts import add_texts

    home, photos = indexed
    with Home.open(resolve(home=home, model=str(tiny_model))) as writer:  # opened, then waiting for its turn
        reindex(resolve(home=home, model=str(other_tiny_model)), progress=False)
        before = rows(home)
        picture(photos / "late.png", 90)
        corpus = home.parent / "late.txt"
        corpus.write_text("a late text\n")
        for write in (lambda: index_paths(writer, [photos], progress=False),
                      lambda: add_texts(writer, corpus, progress=False)):
            with pytest.raises(ModelChangedError):
                write()
        assert rows(home) == before  # no vector of the old model among the new model's
