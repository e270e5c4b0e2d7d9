import os
from pathlib import Path

import pytest

from mmsearch.discover import check_roots, walk
from mmsearch.errors import UsageError
from tests.conftest import make_image


def test_walks_recursively_and_skips_hidden_and_junk(tmp_path: Path):
    make_image(tmp_path / "a.jpg")
    make_image(tmp_path / "sub" / "b.PNG")
    make_image(tmp_path / ".hidden" / "c.jpg")
    make_image(tmp_path / "node_modules" / "d.jpg")
    make_image(tmp_path / "@eaDir" / "e.jpg")
    make_image(tmp_path / "._f.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    found = sorted(os.path.relpath(e.path, tmp_path) for e in walk([str(tmp_path)]))
    assert found == ["a.jpg", os.path.join("sub", "b.PNG")]


def test_entries_carry_size_and_mtime(tmp_path: Path):
    path = make_image(tmp_path / "a.jpg")
    (entry,) = walk([str(tmp_path)])
    st = path.stat()
    assert (entry.size, entry.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_symlink_loop_is_cut_and_files_listed_once(tmp_path: Path):
    make_image(tmp_path / "pics" / "a.jpg")
    os.symlink(tmp_path / "pics", tmp_path / "pics" / "loop")
    found = list(walk([str(tmp_path / "pics"), str(tmp_path / "pics" / "a.jpg")]))
    assert [os.path.basename(e.path) for e in found] == ["a.jpg"]


def test_missing_root_names_it(tmp_path: Path):
    with pytest.raises(UsageError, match="no-such-folder"):
        check_roots([tmp_path / "no-such-folder"])


def test_fifos_and_device_links_are_refused_unopened_and_other_names_counted(tmp_path: Path):
    make_image(tmp_path / "a.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    os.symlink(tmp_path / "a.jpg", tmp_path / "link.jpg")  # a link to a picture is a picture
    (tmp_path / "drawing.svg").write_text("<svg/>")
    (tmp_path / "notes.txt").write_text("not an image")
    refused, ignored = [], []
    found = walk([str(tmp_path)], on_skip=lambda p, r: refused.append((os.path.basename(p), r)), on_ignored=ignored.append)
    assert sorted(os.path.basename(e.path) for e in found) == ["a.jpg", "link.jpg"]
    assert sorted(refused) == [("pipe.jpg", "a FIFO (named pipe), not a file"), ("zero.jpg", "a device, not a file")]
    assert sorted(os.path.basename(p) for p in ignored) == ["drawing.svg", "notes.txt"]
    # named directly, too
    refused.clear()
    assert list(walk([str(tmp_path / "pipe.jpg")], on_skip=lambda p, r: refused.append(r))) == []
    assert refused == ["a FIFO (named pipe), not a file"]
