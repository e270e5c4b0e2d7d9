import json
from pathlib import Path

import pytest

from mmsearch.errors import InputFileError
from mmsearch.home import Home
from mmsearch.settings import resolve
from mmsearch.texts import add_texts, read_corpus, text_key


def test_txt_jsonl_csv(tmp_path: Path):
    (tmp_path / "a.txt").write_text("first line\n\n  second line  \n")
    items, empty, dups = read_corpus(tmp_path / "a.txt")
    source = str((tmp_path / "a.txt").resolve())
    assert [(i.key, i.text) for i in items] == [
        (text_key(source, "first line"), "first line"), (text_key(source, "second line"), "second line")
    ]
    assert items[0].key.startswith("a.txt#") and len(items[0].key) == len("a.txt#") + 16
    assert (empty, dups) == (1, 0)

    lines = [{"id": "x", "text": "hello", "lang": "en"}, {"text": "no id"}, {"id": 7, "text": "num id"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    items, _, _ = read_corpus(tmp_path / "b.jsonl")
    assert [(i.key, i.text, i.meta) for i in items] == [
        ("x", "hello", {"lang": "en"}), (text_key(str((tmp_path / "b.jsonl").resolve()), "no id"), "no id", None),
        ("7", "num id", None),
    ]

    (tmp_path / "c.csv").write_text('id,text,author\n1,"a, quoted text",ann\n2,plain,\n')
    items, _, _ = read_corpus(tmp_path / "c.csv")
    assert [(i.key, i.text, i.meta) for i in items] == [("1", "a, quoted text", {"author": "ann"}), ("2", "plain", None)]


def test_duplicate_ids_keep_the_last(tmp_path: Path):
    (tmp_path / "d.jsonl").write_text('{"id": "k", "text": "old"}\n{"id": "k", "text": "new"}\n')
    items, _, dups = read_corpus(tmp_path / "d.jsonl")
    assert [(i.key, i.text) for i in items] == [("k", "new")] and dups == 1


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", b'{"text": "ok"}\n{not json\n', "bad.jsonl:2: not valid JSON"),
        ("bad2.jsonl", b'{"text": "ok"}\n{"title": "no text"}\n', "bad2.jsonl:2: no 'text' field"),
        ("bad.txt", b"fine\nstill fine\n\xff\xfe broken\n", "bad.txt:3: not valid UTF-8"),
        ("bad.csv", b"id,caption\n1,x\n", "needs a 'text' column"),
        ("bad.docx", b"whatever", "unsupported"),
        ("surrogate.jsonl", b'{"text": "ok"}\n{"text": "half \\ud83d pair"}\n', "surrogate.jsonl:2: 'text' holds an unpaired"),
        ("surrogate2.jsonl", b'{"text": "ok", "id": "\\udc80"}\n', "surrogate2.jsonl:1: 'id' holds an unpaired"),
    ],
)
def test_bad_corpora_name_the_line(tmp_path: Path, name: str, content: bytes, message: str):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputFileError, match=message.replace("(", r"\(")):
        read_corpus(tmp_path / name)


def test_add_texts_is_incremental(tmp_path: Path, tiny_model: Path):
    corpus = tmp_path / "caps.jsonl"
    corpus.write_text('{"id": "1", "text": "a red square"}\n{"id": "2", "text": "blue sky"}\n')
    settings = resolve(home=tmp_path / "home", model=str(tiny_model))
    with Home.open(settings) as home:
        first = add_texts(home, corpus, progress=False)
        assert (first.added, first.updated, first.unchanged) == (2, 0, 0)
        corpus.write_text('{"id": "1", "text": "a red square"}\n{"id": "2", "text": "grey sky"}\n{"text": "new"}\n')
        second = add_texts(home, corpus, progress=False)
        assert (second.added, second.updated, second.unchanged) == (1, 1, 1)
        assert home.catalog.count("text") == 3
        assert sorted(home.index("text").ids()) == sorted(home.catalog.ids("text"))


def test_huge_line_is_truncated_with_a_warning(tmp_path: Path, tiny_model: Path):
    corpus = tmp_path / "long.txt"
    corpus.write_text("short\n" + "word " * 5000 + "\n")
    warnings: list[str] = []
    with Home.open(resolve(home=tmp_path / "home", model=str(tiny_model))) as home:
        report = add_texts(home, corpus, progress=False, on_warning=warnings.append)
    assert report.added == 2 and report.truncated == 1
    assert len(warnings) == 1 and "truncated" in warnings[0] and "long.txt" in warnings[0]


def test_a_run_with_nothing_new_refreshes_a_stale_text_index(tmp_path: Path, tiny_model: Path):
    from mmsearch.index import sidecar_path

    corpus = tmp_path / "caps.txt"
    corpus.write_text("one\ntwo\n")
    settings = resolve(home=tmp_path / "home", model=str(tiny_model))
    with Home.open(settings) as home:
        add_texts(home, corpus, progress=False)
    # as if a run had committed to the catalog and died before saving the index
    sidecar = sidecar_path(settings.index_path("text"))
    sidecar.write_text(sidecar.read_text().replace('"generation": 1', '"generation": 0'))
    with Home.open(settings) as home:
        report = add_texts(home, corpus, progress=False)
        assert report.unchanged == 2
    assert json.loads(sidecar.read_text())["generation"] == 1


def test_repeated_ids_across_chunks_keep_the_last_and_a_re_add_changes_nothing(tmp_path: Path, tiny_model: Path):
    corpus = tmp_path / "d.jsonl"
    records = [{"id": "k", "text": "old"}] + [{"text": f"filler {i}"} for i in range(9)] + [{"id": "k", "text": "new"}]
    records += [{"text": "filler 3"}]  # a repeated text without id, in another chunk
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    with Home.open(resolve(home=tmp_path / "home", model=str(tiny_model))) as home:
        first = add_texts(home, corpus, progress=False, chunk=4)
        assert (first.added, first.updated, first.duplicates) == (10, 0, 2)
        ((_, text),) = home.catalog.text_states(["k"]).values()
        assert text == "new"
        generation = home.catalog.generation("text")
        again = add_texts(home, corpus, progress=False, chunk=4)
        assert (again.added, again.updated, again.unchanged, again.duplicates) == (0, 0, 10, 2)
        assert home.catalog.generation("text") == generation


def test_a_corpus_past_the_threshold_leaves_an_ivf_index(tmp_path: Path, tiny_model: Path, monkeypatch):
    from mmsearch import index as index_mod
    from mmsearch.index import VectorIndex, sidecar_is_current

    monkeypatch.setattr(index_mod, "EXACT_MAX", 300)
    corpus = tmp_path / "many.txt"
    corpus.write_text("".join(f"caption number {i}\n" for i in range(200)))
    settings = resolve(home=tmp_path / "home", model=str(tiny_model))
    with Home.open(settings) as home:
        add_texts(home, corpus, progress=False, chunk=64)
        assert VectorIndex.load(settings.index_path("text")).index_type == "flat"
        corpus.write_text("".join(f"caption number {i}\n" for i in range(700)))
        report = add_texts(home, corpus, progress=False, chunk=64)
        assert (report.added, report.unchanged) == (500, 200)
        saved = VectorIndex.load(settings.index_path("text"))
        assert saved.index_type == "ivf" and saved.count == 700
        assert sidecar_is_current(settings.index_path("text"), home.catalog.generation("text"), home.dim,
                                  home.spec.canonical)
        assert sorted(saved.ids()) == sorted(home.catalog.ids("text"))


def test_a_file_that_changes_during_the_run_is_an_error(tmp_path: Path, tiny_model: Path, monkeypatch):
    import mmsearch.texts as texts

    corpus = tmp_path / "grow.txt"
    corpus.write_text("one\ntwo\n")
    real_scan = texts.scan_corpus

    def scan_then_append(path, progress=False):
        scan = real_scan(path, progress)
        with open(path, "a") as fh:
            fh.write("three\n")
        return scan

    monkeypatch.setattr(texts, "scan_corpus", scan_then_append)
    with Home.open(resolve(home=tmp_path / "home", model=str(tiny_model))) as home:
        with pytest.raises(InputFileError, match="grow.txt changed while it was being added"):
            add_texts(home, corpus, progress=False)
