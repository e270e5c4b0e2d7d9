"""A catalog on a PostgreSQL server, end to end through the CLI: the same results as SQLite,
a second home that searches without indexing, status without the password, a lost
connection mid-index, and the --catalog option's bad values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mmsearch.check import check_home
from mmsearch.cli import app
from mmsearch.settings import resolve

runner = CliRunner()


def hits(base: list[str], *query: str) -> list[dict]:
    result = runner.invoke(app, [*base, "search", *query, "-k", "6", "--json"])
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_same_results_on_both_backends_and_a_second_home_searches_without_indexing(
    photo_dir: Path, tmp_path: Path, tiny_model: Path, pg_server
) -> None:
    url = pg_server.new_database()
    on_sqlite = ["--home", str(tmp_path / "sqlite-home"), "--model", str(tiny_model)]
    on_server = ["--home", str(tmp_path / "pg-home"), "--model", str(tiny_model), "--catalog", url]
    for base in (on_sqlite, on_server):
        result = runner.invoke(app, [*base, "index", "--quiet", str(photo_dir)])
        assert result.exit_code == 0, result.output
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a red square\na green field\nthe blue sea\n")
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("image,text\n" + "".join(
        f"{photo_dir / name},{text}\n" for name, text in [("red.jpg", "red"), ("green.png", "green"), ("white.bmp", "white")]
    ))
    recall = {}
    for name, base in (("sqlite", on_sqlite), ("postgresql", on_server)):
        result = runner.invoke(app, [*base, "add-texts", "--quiet", str(corpus)])
        assert result.exit_code == 0, result.output
        result = runner.invoke(app, [*base, "eval", "--quiet", "--json", str(pairs)])
        assert result.exit_code == 0, result.output
        recall[name] = json.loads(result.stdout)
    assert recall["sqlite"] == recall["postgresql"]
    for query in (["a red square"], ["--image", str(photo_dir / "green.png")], ["--texts", "red"],
                  ["--texts", "--image", str(photo_dir / "red.jpg")]):
        assert hits(on_sqlite, *query) == hits(on_server, *query)  # ids, paths, scores: identical
    status = json.loads(runner.invoke(app, [*on_server, "status", "--json"]).stdout)
    assert (status["images"], status["texts"]) == (6, 3)  # eval's temporary index stayed out of the catalog

    # another machine: a home folder of its own on the same catalog, nothing indexed there
    elsewhere = tmp_path / "other-machine"
    other = ["--home", str(elsewhere), "--catalog", url]  # the model comes from the catalog
    assert hits(other, "a red square") == hits(on_server, "a red square")
    assert (elsewhere / "images.faiss").exists() and not (elsewhere / "catalog.sqlite3").exists()
    status = json.loads(runner.invoke(app, [*other, "status", "--json"]).stdout)
    assert (status["images"], status["texts"], status["catalog_backend"], status["catalog_url"]) == (
        6, 3, "postgresql", url)
    check = runner.invoke(app, [*other, "check", "--json"])  # no text search there yet: no texts.faiss
    assert [(f["code"], f["kind"]) for f in json.loads(check.stdout)["findings"]] == [("no-index", "text")]
    assert runner.invoke(app, [*other, "check", "--repair"]).exit_code == 0
    check = runner.invoke(app, [*other, "check", "--json"])
    assert check.exit_code == 0 and json.loads(check.stdout)["findings"] == []


def test_status_and_errors_never_show_the_password(pg_server, tmp_path: Path, photo_dir: Path, tiny_model: Path) -> None:
    url = pg_server.new_database()
    secret = url.replace("mmsearch@", "mmsearch:s3cr3t-pw@")  # the test server trusts its socket: any password works
    base = ["--home", str(tmp_path / "home"), "--model", str(tiny_model), "--catalog", secret]
    assert runner.invoke(app, [*base, "index", "--quiet", str(photo_dir)]).exit_code == 0
    human = runner.invoke(app, [*base, "status"])
    assert human.exit_code == 0 and f"catalog: postgresql {url}" in human.stdout.splitlines()
    as_json = runner.invoke(app, [*base, "status", "--json"])
    assert json.loads(as_json.stdout)["catalog_url"] == url
    missing = secret.replace("/t", "/no_such_db_t", 1)
    failed = runner.invoke(app, ["--home", str(tmp_path / "home"), "--catalog", missing, "status"])
    assert failed.exit_code == 1
    [line] = failed.stderr.strip().splitlines()
    assert line.startswith("error: cannot open catalog postgresql+psycopg://mmsearch@/no_such_db_t")
    for result in (human, as_json, failed):
        assert "s3cr3t" not in result.output


def test_a_lost_connection_mid_index_is_one_line_and_the_next_run_goes_on(
    pg_server, tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mmsearch.store as store
    from test_crash import picture

    url = pg_server.new_database()
    photos, home = tmp_path / "photos", tmp_path / "home"
    files = {str(picture(photos / f"{i}.png", i)) for i in range(6)}
    base = ["--home", str(home), "--model", str(tiny_model), "--batch-size", "2", "--workers", "0", "--catalog", url]
    original, calls = store._bump_generation, []

    def server_goes_away(conn, kind):  # in the second batch's transaction, every connection is cut
        calls.append(kind)
        if len(calls) == 2:
            pg_server.terminate(url)
        original(conn, kind)

    monkeypatch.setattr(store, "_bump_generation", server_goes_away)
    result = runner.invoke(app, [*base, "index", "--quiet", str(photos)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot write to catalog {url}: lost the connection to the server (")
    monkeypatch.setattr(store, "_bump_generation", original)

    settings = resolve(home=home, catalog=url)
    with store.Catalog.open(url) as catalog:
        kept = set(catalog.image_paths(catalog.ids("image").tolist()).values())
    assert len(kept) == 2 and kept < files  # the first batch, committed before the cut
    again = runner.invoke(app, [*base, "index", "--quiet", "--json", str(photos)])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout.splitlines()[-1])["added"] == 4
    report = check_home(settings)
    assert report.findings == [] and report.counts["image"] == {"catalog": 6, "index": 6}


def test_bad_catalog_values_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = ["--home", str(tmp_path / "home")]
    for value, expected in [
        ("mysql://me:pw@db/photos", "error: --catalog 'mysql://me@db/photos': only PostgreSQL catalogs are supported"),
        ("postgresql://me:pw@db", "error: --catalog 'postgresql://me@db' names no database"),
        ("not a url", "error: --catalog 'not a url' is not a database URL"),
    ]:
        result = runner.invoke(app, [*home, "--catalog", value, "status"])
        assert result.exit_code == 2 and result.stderr.startswith(expected), result.output
        assert "pw" not in result.output
    monkeypatch.setenv("MMSEARCH_CATALOG", "postgresql://me@db/photos")
    assert resolve(home=tmp_path).catalog == "postgresql+psycopg://me@db/photos"
    assert resolve(home=tmp_path, catalog="postgresql+psycopg://you@db/x").catalog == "postgresql+psycopg://you@db/x"
    monkeypatch.delenv("MMSEARCH_CATALOG")
    assert resolve(home=tmp_path).catalog is None


def test_a_home_pointed_at_another_catalog_rebuilds_its_index(
    photo_dir: Path, tmp_path: Path, tiny_model: Path, pg_server
) -> None:
    from conftest import make_image

    url = pg_server.new_database()
    home = ["--home", str(tmp_path / "home"), "--model", str(tiny_model)]
    assert runner.invoke(app, [*home, "index", "--quiet", str(photo_dir)]).exit_code == 0  # its own SQLite file
    lone = make_image(tmp_path / "elsewhere" / "lone.png", "red")
    assert runner.invoke(app, [*home, "--catalog", url, "index", "--quiet", str(lone.parent)]).exit_code == 0
    # both catalogs are at image generation 1; the index must follow the catalog, not the number
    assert [h["path"] for h in hits([*home, "--catalog", url], "red")] == [str(lone)]
    assert len(hits(home, "red")) == 6
    assert [h["path"] for h in hits([*home, "--catalog", url], "red")] == [str(lone)]


def test_reindex_on_a_server_catalog_switches_both_backends_alike(
    photo_dir: Path, tmp_path: Path, tiny_model: Path, other_tiny_model: Path, pg_server
) -> None:
    url = pg_server.new_database()
    corpus = tmp_path / "captions.txt"
    corpus.write_text("a red square\na green field\nthe blue sea\n")
    homes = {
        "sqlite": ["--home", str(tmp_path / "sqlite-home")],
        "postgresql": ["--home", str(tmp_path / "pg-home"), "--catalog", url],
    }
    reports = {}
    for name, base in homes.items():
        for command in (["index", "--quiet", str(photo_dir)], ["add-texts", "--quiet", str(corpus)]):
            result = runner.invoke(app, [*base, "--model", str(tiny_model), *command])
            assert result.exit_code == 0, result.output
        result = runner.invoke(app, [*base, "--model", str(other_tiny_model), "reindex", "--quiet", "--json"])
        assert result.exit_code == 0, result.output
        reports[name] = json.loads(result.stdout.splitlines()[-1])
        status = json.loads(runner.invoke(app, [*base, "status", "--json"]).stdout)
        assert status["model"] == f"local-dir:{other_tiny_model}" and status["dim"] == 24
        assert "reindex" not in status
    for report in reports.values():
        report.pop("seconds")
    assert reports["sqlite"] == reports["postgresql"] and reports["sqlite"]["switched"]
    for query in (["a red square"], ["--texts", "red"]):
        assert hits(homes["sqlite"], *query) == hits(homes["postgresql"], *query)
