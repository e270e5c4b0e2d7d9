"""Search in all four directions, query arithmetic, vanished files."""

import os
from pathlib import Path

import numpy as np
import pytest

from mmsearch.errors import EmptyIndexError, InputFileError, UsageError
from mmsearch.home import Home
from mmsearch.indexer import index_paths
from mmsearch.search import parse_query, query_vector, search
from mmsearch.settings import resolve
from mmsearch.texts import add_texts


@pytest.fixture
def loaded(photo_dir: Path, tmp_path: Path, tiny_model: Path):
    corpus = tmp_path / "caps.txt"
    corpus.write_text("a red picture\na green picture\na blue picture\nsomething else entirely\n")
    with Home.open(resolve(home=tmp_path / "home", model=str(tiny_model))) as home:
        index_paths(home, [photo_dir], progress=False)
        add_texts(home, corpus, progress=False)
        yield home


def _brute_force(home: Home, vector: np.ndarray, kind: str) -> list[int]:
    ids = home.catalog.ids(kind)
    vecs = home.catalog.vectors(kind, list(ids), home.dim)
    return sorted(ids, key=lambda i: -float(vecs[i] @ vector))


def test_text_to_image_matches_brute_force(loaded: Home):
    hits = search(loaded, "a red picture", k=4)
    assert [h.rank for h in hits] == [1, 2, 3, 4]
    assert all(os.path.isabs(h.path) for h in hits)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    expected = _brute_force(loaded, query_vector(loaded, "a red picture", None), "image")[:4]
    assert [h.id for h in hits] == expected


def test_image_to_image_finds_itself_first(loaded: Home, photo_dir: Path):
    hits = search(loaded, image=photo_dir / "green.png", k=3)
    assert hits[0].path == str(photo_dir / "green.png") and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_image_to_text_and_text_to_text(loaded: Home, photo_dir: Path):
    by_image = search(loaded, image=photo_dir / "red.jpg", target="text", k=10)
    assert len(by_image) == 4 and {h.text for h in by_image} >= {"a red picture"}
    by_text = search(loaded, "a blue picture", target="text", k=1)
    assert by_text[0].text == "a blue picture" and by_text[0].id.startswith("caps.txt#")
    assert by_text[0].score == pytest.approx(1.0, abs=1e-4)


def test_vanished_files_are_never_returned(loaded: Home, photo_dir: Path):
    os.remove(photo_dir / "green.png")
    hits = search(loaded, image=photo_dir / "red.jpg", k=10)
    assert len(hits) == 5 and all("green" not in h.path for h in hits)


def test_query_arithmetic(loaded: Home, photo_dir: Path):
    terms = parse_query(f"cat + 2:snow - dog + {photo_dir / 'red.jpg'} + t-shirt")
    assert [(t.weight, t.text) for t in terms][:3] == [(1.0, "cat"), (2.0, "snow"), (-1.0, "dog")]
    assert terms[3].image == photo_dir / "red.jpg" and terms[4].text == "t-shirt"
    enc = loaded.encoder()
    cat, snow, dog = enc.embed_texts(["cat", "snow", "dog"])
    expected = cat + 2 * snow - dog
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(query_vector(loaded, "cat + 2:snow - dog", None), expected, atol=1e-5)


def test_bad_queries(loaded: Home, tmp_path: Path):
    with pytest.raises(UsageError):
        search(loaded, None)
    with pytest.raises(UsageError):
        search(loaded, "cat", k=0)
    with pytest.raises(UsageError, match="cancel"):
        search(loaded, "cat - cat")
    (tmp_path / "notes.jpg").write_text("not an image")
    with pytest.raises(InputFileError, match="notes.jpg"):
        search(loaded, image=tmp_path / "notes.jpg")


def test_empty_home(tmp_path: Path, tiny_model: Path):
    with Home.open(resolve(home=tmp_path / "empty", model=str(tiny_model))) as home:
        with pytest.raises(EmptyIndexError, match="mmsearch index"):
            search(home, "anything")
        with pytest.raises(EmptyIndexError, match="add-texts"):
            search(home, "anything", target="text")
