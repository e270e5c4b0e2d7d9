"""The long-lived Library: inputs of every form, caching, reloads, threads."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
from PIL import Image

from conftest import COLOURS, make_image
from mmsearch import Library
from mmsearch.errors import EmptyIndexError, InputFileError, MmsearchError, UsageError


def test_import_mmsearch_stays_light():
    code = "import sys, mmsearch; print(sorted(m for m in ('torch', 'open_clip', 'faiss', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_progress_callback_and_counts(home, tiny_model, photo_dir):
    calls: list[tuple[int, int]] = []
    with Library.open(home, model=str(tiny_model)) as lib:
        report = lib.add_images([photo_dir], progress=lambda done, total: calls.append((done, total)))
        assert report.added == 6 and lib.count("image") == 6
    assert calls and calls[-1] == (6, 6)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_image_as_path_bytes_or_picture_give_one_answer(library, photo_dir):
    path = photo_dir / "green.png"
    by_path = library.search(image=path, k=3)
    by_bytes = library.search(image=path.read_bytes(), k=3)
    with Image.open(path) as img:
        by_picture = library.search(image=img.copy(), k=3)
    for hits in (by_bytes, by_picture):
        assert [h.id for h in hits] == [h.id for h in by_path]
        assert [h.score for h in hits] == pytest.approx([h.score for h in by_path], abs=1e-5)
    assert by_path[0].path == str(path)


def test_bad_inputs_are_library_errors_without_cli_flags(library, tmp_path):
    for call in (
        lambda: library.search("red", k=0),
        lambda: library.search(image=b"not an image"),
        lambda: library.search(image=b""),
        lambda: library.search(image=tmp_path / "missing.jpg"),
        lambda: library.search(),
        lambda: library.search("red", target="text"),
        lambda: library.similar(12345),
    ):
        with pytest.raises(MmsearchError) as info:
            call()
        assert "--" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(UsageError):
        library.search("red", k=0)
    with pytest.raises(InputFileError):
        library.search(image=b"not an image")
    with pytest.raises(EmptyIndexError):
        library.search("red", target="text")


def test_files_false_never_reads_a_term_as_a_path(library, photo_dir, monkeypatch):
    import mmsearch.search as search_mod

    term = str(photo_dir / "red.jpg")
    as_image = library.search(term, k=1)
    assert as_image[0].path == term  # the CLI's behaviour: the term is that image
    monkeypatch.setattr(search_mod, "open_query_image", lambda *a, **k: pytest.fail("opened a path"))
    as_text = library.search(term, k=1, files=False)
    assert as_text and as_text[0].score < 0.99


def test_index_is_cached_and_reloaded_when_another_writer_commits(library, home, tiny_model, tmp_path):
    first = library.index("image")
    library.search("red")
    assert library.index("image") is first  # nothing changed: no reload
    more = tmp_path / "more"
    make_image(more / "purple.png", (128, 0, 128))
    with Library.open(home) as other:  # another writer on the same home (another process does the same)
        other.add_images([more])
    hits = library.search(image=more / "purple.png", k=1)
    assert hits[0].path == str(more / "purple.png")
    assert library.index("image") is not first and library.index("image").count == 7


def test_similar_starts_with_the_image_itself(library):
    hits = library.similar(1, k=3)
    assert hits[0].id == 1 and len(hits) == 3
    assert library.image_file(1) is not None and library.image_file(999) is None


def test_many_threads_search_while_one_indexes(library, tmp_path):
    more = tmp_path / "incoming"
    for i in range(40):
        make_image(more / f"new{i:02d}.png", ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256), size=(40 + i, 40))
    errors: list[BaseException] = []
    seen_counts: list[int] = []
    stop = threading.Event()

    def searcher(n: int) -> None:
        try:
            while not stop.is_set():
                query = list(COLOURS)[n % len(COLOURS)]
                hits = library.search(query, k=50) if n % 2 else library.search(image=make_bytes(n), k=50)
                scores = [h.score for h in hits]
                assert scores == sorted(scores, reverse=True)
                assert [h.rank for h in hits] == list(range(1, len(hits) + 1))
                assert len({h.id for h in hits}) == len(hits)
                assert all(Path(str(h.path)).is_file() for h in hits)
                seen_counts.append(len(hits))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=searcher, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    try:
        report = library.add_images([more])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert report.added == 40
    assert min(seen_counts) >= 6 and seen_counts
    assert len(library.search("red", k=100)) == 46  # the new images, without reopening


def make_bytes(n: int) -> bytes:
    import io

    out = io.BytesIO()
    Image.new("RGB", (48, 32), ((n * 50) % 256, 120, 30)).save(out, "PNG")
    return out.getvalue()
