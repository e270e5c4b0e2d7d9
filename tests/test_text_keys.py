"""Text keys that cannot collide: two corpora of one name, inserted lines, repeated texts,
and catalogs keyed FILENAME:LINE before revision 0006, upgraded."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from mmsearch import modelspec
from mmsearch.home import Home
from mmsearch.migrate import alembic_config
from mmsearch.settings import resolve
from mmsearch.store import Catalog, make_engine
from mmsearch.texts import add_texts, text_key


def stored(home: Home) -> dict[str, tuple[int, str, str]]:
    """key -> (id, text, source) of every stored text."""
    with home.catalog.engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT key, id, text, source FROM texts").fetchall()
    return {k: (i, t, s) for k, i, t, s in rows}


def test_same_file_name_in_two_folders_keeps_both(tmp_path: Path, tiny_model: Path) -> None:
    a, b = tmp_path / "a" / "captions.txt", tmp_path / "b" / "captions.txt"
    a.parent.mkdir()
    b.parent.mkdir()
    a.write_text("a red square\na blue sky\n")
    b.write_text("a green field\na blue sky\n")  # one text in common, in another corpus
    with Home.open(resolve(home=tmp_path / "home", model=str(tiny_model))) as home:
        first = add_texts(home, a, progress=False)
        second = add_texts(home, b, progress=False)
        assert (first.added, second.added, second.updated, second.unchanged) == (2, 2, 0, 0)
        texts = stored(home)
        assert sorted(t for _i, t, _s in texts.values()) == ["a blue sky", "a blue sky", "a green field", "a red square"]
        assert {s for _i, _t, s in texts.values()} == {str(a.resolve()), str(b.resolve())}
        assert all(k.startswith("captions.txt#") for k in texts)
        again = add_texts(home, a, progress=False)
        assert (again.added, again.updated, again.unchanged) == (0, 0, 2)
        assert stored(home) == texts


def test_an_inserted_line_moves_no_other_key(tmp_path: Path, tiny_model: Path) -> None:
    corpus = tmp_path / "caps.txt"
    corpus.write_text("one\ntwo\nthree\n")
    with Home.open(resolve(home=tmp_path / "home", model=str(tiny_model))) as home:
        add_texts(home, corpus, progress=False)
        before = stored(home)
        generation = home.catalog.generation("text")
        assert (add_texts(home, corpus, progress=False).unchanged, home.catalog.generation("text")) == (3, generation)
        corpus.write_text("zero\none\ntwo\nthree\n")
        report = add_texts(home, corpus, progress=False)
        assert (report.added, report.updated, report.unchanged) == (1, 0, 3)
        after = stored(home)
        assert {k: v for k, v in after.items() if k in before} == before and len(after) == 4


def test_a_repeated_text_without_id_is_one_text(tmp_path: Path, tiny_model: Path) -> None:
    corpus = tmp_path / "caps.jsonl"
    lines = [{"text": "a cat", "n": 1}, {"text": "a dog"}, {"text": "a cat", "n": 3}]
    corpus.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with Home.open(resolve(home=tmp_path / "home", model=str(tiny_model))) as home:
        report = add_texts(home, corpus, progress=False)
        assert (report.added, report.duplicates) == (2, 1)
        cat = home.catalog.text_states([text_key(str(corpus.resolve()), "a cat")])
        (cat_id, _text), = cat.values()
        assert home.catalog.texts_by_id([cat_id])[cat_id]["meta"] == {"n": 3}  # the last occurrence


def test_a_corpus_id_in_a_second_file_replaces_it(tmp_path: Path, tiny_model: Path) -> None:
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    one.write_text(json.dumps({"id": "k", "text": "first"}) + "\n")
    two.write_text(json.dumps({"id": "k", "text": "second"}) + "\n")
    with Home.open(resolve(home=tmp_path / "home", model=str(tiny_model))) as home:
        add_texts(home, one, progress=False)
        report = add_texts(home, two, progress=False)
        assert (report.added, report.updated) == (0, 1)
        assert stored(home)["k"][1:] == ("second", str(two.resolve()))


def test_a_taken_short_key_falls_back_to_the_long_one(tmp_path: Path, tiny_model: Path) -> None:
    corpus = tmp_path / "caps.txt"
    corpus.write_text("a bird\n")
    short = text_key(str(corpus.resolve()), "a bird")
    squatter = tmp_path / "ids.jsonl"  # a corpus id spelt like that key, as a 64-bit collision would be
    squatter.write_text(json.dumps({"id": short, "text": "something else"}) + "\n")
    with Home.open(resolve(home=tmp_path / "home", model=str(tiny_model))) as home:
        add_texts(home, squatter, progress=False)
        assert add_texts(home, corpus, progress=False).added == 1
        texts = stored(home)
        assert texts[short][1] == "something else"
        assert texts[text_key(str(corpus.resolve()), "a bird", long=True)][1] == "a bird"
        assert add_texts(home, corpus, progress=False).unchanged == 1


# -- catalogs keyed FILENAME:LINE (revision 0005), upgraded ---------------------------------

def old_catalog(path: Path, model: str, rows: list[tuple[str, str, str, str | None]], dim: int = 32) -> None:
    """A catalog at revision 0005 holding ``(key, text, source, meta)`` rows as add-texts wrote them then."""
    from alembic import command

    engine = make_engine(path)
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
    rng = np.random.default_rng(0)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO meta (key, value) VALUES ('model', ?), ('dim', ?)", (model, str(dim)))
        conn.exec_driver_sql("INSERT INTO meta (key, value) VALUES ('generation.text', '1')")
        for key, text, source, meta in rows:
            vector = rng.normal(size=dim).astype("<f2").tobytes()  # an empty catalog at 0004 is float16
            conn.exec_driver_sql(
                "INSERT INTO texts (key, text, source, meta, vector, indexed_at) VALUES (?, ?, ?, ?, ?, ?)",
                (key, text, source, meta, vector, time.time()),
            )
    engine.dispose()


def test_upgrade_rekeys_old_texts_and_a_re_add_finds_them_unchanged(tmp_path: Path, tiny_model: Path) -> None:
    caps, jsonl = tmp_path / "caps.txt", tmp_path / "more.jsonl"
    caps.write_text("a red square\n\na blue sky\na red square\n")  # the same text on lines 1 and 4
    jsonl.write_text(json.dumps({"text": "no id", "lang": "en"}) + "\n" + json.dumps({"id": "x", "text": "given"}) + "\n")
    cs, js = str(caps.resolve()), str(jsonl.resolve())
    model = modelspec.parse(str(tiny_model)).canonical
    home_dir = tmp_path / "home"
    home_dir.mkdir()
    catalog_path = home_dir / "catalog.sqlite3"
    # as add-texts wrote them before 0006 (it inserted shortest texts first), plus a corpus id
    # that looks like an old key of another file
    old_catalog(catalog_path, model, [
        ("caps.txt:3", "a blue sky", cs, None),
        ("caps.txt:1", "a red square", cs, None),
        ("caps.txt:4", "a red square", cs, None),
        ("more.jsonl:1", "no id", js, '{"lang": "en"}'),
        ("x", "given", js, None),
        ("other.txt:9", "kept as an id", js, None),
    ])
    engine = make_engine(catalog_path)  # no migration yet
    with engine.connect() as conn:
        before = {k: (i, v) for k, i, v in conn.exec_driver_sql("SELECT key, id, vector FROM texts")}
    engine.dispose()

    with Home.open(resolve(home=home_dir, model=str(tiny_model))) as home:
        after = {k: (i, v) for k, (i, _t, _s) in stored(home).items()
                 for v in [home.catalog.vectors("text", [i], 32)[i]]}
        assert set(after) == {
            text_key(cs, "a blue sky"), text_key(cs, "a red square"), text_key(js, "no id"), "x", "other.txt:9"
        }
        # ids and vectors survive; of the two rows of one text, line 4's is kept
        assert after[text_key(cs, "a red square")][0] == before["caps.txt:4"][0]
        for old, new in [("caps.txt:3", text_key(cs, "a blue sky")), ("more.jsonl:1", text_key(js, "no id")), ("x", "x")]:
            assert after[new][0] == before[old][0]
            np.testing.assert_array_equal(after[new][1], np.frombuffer(before[old][1], "<f2").astype(np.float32))
        assert home.catalog.generation("text") == 2  # a row went: the index is rebuilt without it

        for corpus, texts in ((caps, 2), (jsonl, 2)):
            report = add_texts(home, corpus, progress=False)
            assert (report.added, report.updated, report.unchanged) == (0, 0, texts)
        assert home.catalog.count("text") == 5
        assert sorted(home.index("text").ids()) == sorted(home.catalog.ids("text"))


def test_upgrade_of_a_catalog_without_old_keys_changes_nothing(tmp_path: Path, tiny_model: Path) -> None:
    path = tmp_path / "catalog.sqlite3"
    old_catalog(path, "m", [("a", "one", "/x/c.jsonl", None), ("b", "two", "/x/c.jsonl", None)])
    with Catalog.open(path) as catalog:
        assert sorted(catalog.text_states(["a", "b"])) == ["a", "b"]
        assert catalog.generation("text") == 1
