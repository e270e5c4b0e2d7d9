"""Bad input files: each is indexed correctly or skipped with one stderr line naming it,
and the run goes on. A generated corpus of what years of photos from many cameras hold."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import mmsearch.files as files
import mmsearch.indexer as indexer
from conftest import make_image
from mmsearch.cli import app
from mmsearch.decode import load_image
from mmsearch.settings import resolve
from mmsearch.store import Catalog

runner = CliRunner()


def _png_chunk(tag: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body) & 0xFFFFFFFF)


def make_bad_corpus(root: Path) -> tuple[set[str], set[str]]:
    """``(files that must be indexed, files that must be skipped)``, as absolute paths."""
    good, bad = set(), set()
    root.mkdir(parents=True)

    def ok(path: Path) -> None:
        good.add(str(path))

    def ko(path: Path) -> None:
        bad.add(str(path))

    ok(make_image(root / "plain.jpg", (200, 10, 10)))
    (root / "zero.jpg").write_bytes(b"")
    ko(root / "zero.jpg")
    jpeg = (root / "plain.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    ko(root / "truncated.jpg")
    png = make_image(root / "tmp.png").read_bytes()
    (root / "tmp.png").unlink()
    (root / "truncated.png").write_bytes(png[: len(png) // 2])
    ko(root / "truncated.png")
    (root / "text.jpg").write_text("not a picture at all\n")
    ko(root / "text.jpg")
    # a decompression bomb: a PNG header that declares 100000 x 100000 pixels
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    (root / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )
    ko(root / "bomb.png")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(root / "cmyk.jpg")
    ok(root / "cmyk.jpg")
    Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)).save(root / "16bit.png")
    ok(root / "16bit.png")
    palette = Image.new("P", (40, 30))
    palette.putpalette([255, 0, 0, 0, 255, 0] * 128)
    palette.save(root / "palette-transparent.png", transparency=0)
    ok(root / "palette-transparent.png")
    Image.new("L", (40, 30), 128).save(root / "grey.jpg")
    ok(root / "grey.jpg")
    frames = [Image.new("RGB", (40, 30), c) for c in ("red", "blue")]
    for name in ("animated.gif", "animated.webp"):
        frames[0].save(root / name, save_all=True, append_images=frames[1:], duration=100, loop=0)
        ok(root / name)
    os.symlink("loop.jpg", root / "loop.jpg")  # a link to itself
    ko(root / "loop.jpg")
    (root / "sub").mkdir()
    os.symlink("..", root / "sub" / "up")  # a folder loop: cut, nothing reported
    undecodable = Path(os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9-latin1.jpg"))
    ok(make_image(undecodable, (10, 200, 10)))
    deep = root
    for _ in range(10):  # a path of ~2000 characters: long but legal
        deep = deep / ("d" * 200)
    ok(make_image(deep / "deep.jpg", (10, 10, 200)))
    return good, bad


def catalog_paths(home: Path) -> set[str]:
    with Catalog.open(home / "catalog.sqlite3", create=False) as catalog:
        return set(catalog.image_paths(catalog.ids("image").tolist()).values())


def skip_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("skipped ")]


def show(path: str) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def test_bad_files_are_indexed_or_skipped_with_one_line(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, home = tmp_path / "corpus", tmp_path / "home"
    good, bad = make_bad_corpus(root)
    # an unreadable file: chmod 000 stops everyone but root, so as root the read is refused here
    locked = make_image(root / "no-permission.jpg", (50, 50, 50))
    bad.add(str(locked))
    if os.geteuid() == 0:
        real_open = files.open_nonblocking

        def refusing_open(path: str) -> int:
            if path == str(locked):
                raise PermissionError(13, "Permission denied", path)
            return real_open(path)

        monkeypatch.setattr(files, "open_nonblocking", refusing_open)
    else:
        locked.chmod(0)
    # a file deleted between discovery and decoding
    vanishing = make_image(root / "vanishing.jpg", (90, 90, 90))
    bad.add(str(vanishing))
    real_decode = indexer.decode_file

    def deleting_decode(entry, *args, **kwargs):  # type: ignore[no-untyped-def]
        if entry.path == str(vanishing):
            vanishing.unlink()
        return real_decode(entry, *args, **kwargs)

    monkeypatch.setattr(indexer, "decode_file", deleting_decode)

    base = ["--home", str(home), "--model", str(tiny_model)]
    result = runner.invoke(app, [*base, "index", "--quiet", "--json", str(root)])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout.splitlines()[-1])
    assert counts["added"] == len(good) and counts["skipped"] == len(bad)
    lines = skip_lines(result.stderr)
    assert len(lines) == len(bad)
    for path in bad:  # one line each, naming the file
        assert sum(line.startswith(f"skipped {show(path)}: ") for line in lines) == 1, (path, lines)
    assert catalog_paths(home) == good
    assert "Traceback" not in result.output

    # non-UTF-8 names round-trip: search prints a path that opens the file
    found = runner.invoke(app, [*base, "search", "green", "-k", "50", "--json"])
    paths = {json.loads(line)["path"] for line in found.stdout.splitlines()}
    assert paths == good and all(os.path.exists(p) for p in paths)
    human = runner.invoke(app, [*base, "search", "green", "-k", "50"])
    assert "caf\\xe9-latin1.jpg" in human.stdout

    monkeypatch.undo()
    locked.unlink()
    again = runner.invoke(app, [*base, "index", "--quiet", "--json", "--strict", str(root)])
    counts = json.loads(again.stdout.splitlines()[-1])
    assert counts["unchanged"] == len(good) and counts["added"] == counts["removed"] == 0
    assert again.exit_code == 3  # --strict: the bad files are still there and skipped


def test_path_longer_than_path_max_is_skipped(tmp_path: Path, tiny_model: Path) -> None:
    root, home = tmp_path / "corpus", tmp_path / "home"
    make_image(root / "ok.jpg")
    fd = os.open(root, os.O_RDONLY)
    try:  # 25 levels of 200 characters: ~5000, over Linux's 4096 PATH_MAX
        for _ in range(25):
            os.mkdir("e" * 200, dir_fd=fd)
            new = os.open("e" * 200, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = new
        with open(os.open("deep.jpg", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            Image.new("RGB", (20, 20)).save(fh, "JPEG")
    finally:
        os.close(fd)
    result = runner.invoke(app, ["--home", str(home), "--model", str(tiny_model), "index", "--quiet", "--json", str(root)])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout.splitlines()[-1])
    assert counts["added"] == 1 and counts["skipped"] == 1
    [line] = skip_lines(result.stderr)
    assert "File name too long" in line


# exif_transpose applies, for each EXIF orientation, the inverse of the transform
# that produced the stored pixels; these make the stored pixels from the upright ones.
STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def upright_picture() -> Image.Image:
    """Asymmetric: every flip or rotation of it is a different picture."""
    img = Image.new("RGB", (48, 32), (240, 240, 240))
    img.paste((220, 20, 20), (0, 0, 24, 8))
    img.paste((20, 20, 220), (40, 16, 48, 32))
    img.paste((20, 180, 20), (0, 24, 8, 32))
    return img


def save_oriented(path: Path, upright: Image.Image, orientation: int, **kwargs: object) -> Path:
    stored = upright if STORED[orientation] is None else upright.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, exif=exif, **kwargs)
    return path


def test_all_eight_exif_orientations_come_out_upright(tmp_path: Path, tiny_model: Path) -> None:
    upright = upright_picture()
    want = np.asarray(upright, dtype=np.int16)
    folder = tmp_path / "oriented"
    folder.mkdir()
    for orientation in STORED:
        png = save_oriented(folder / f"o{orientation}.png", upright, orientation)
        assert np.array_equal(np.asarray(load_image(str(png)), dtype=np.int16), want), orientation
        # a JPEG 4x larger, decoded at reduced scale (draft) as the indexer does
        big = upright.resize((192, 128), Image.Resampling.NEAREST)
        jpeg = save_oriented(tmp_path / f"o{orientation}.jpg", big, orientation, quality=95)
        got = np.asarray(load_image(str(jpeg), 32), dtype=np.int16)
        assert got.shape == want.shape and np.abs(got - want).mean() < 8, orientation

    home = tmp_path / "home"
    result = runner.invoke(app, ["--home", str(home), "--model", str(tiny_model), "index", "--quiet", str(folder)])
    assert result.exit_code == 0, result.output
    settings = resolve(home=home, model=str(tiny_model))
    with Catalog.open(settings.catalog_path, create=False) as catalog:
        vectors = catalog.vectors("image", catalog.ids("image").tolist(), 32)
    assert len(vectors) == 8
    reference = vectors[min(vectors)]
    for vector in vectors.values():
        np.testing.assert_allclose(vector, reference, atol=1e-6)


def test_file_rewritten_while_indexing_is_caught(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, home = tmp_path / "photos", tmp_path / "home"
    before_read = make_image(root / "before-read.png", (200, 0, 0))
    after_read = make_image(root / "after-read.png", (0, 200, 0))
    real_decode = indexer.decode_file

    def rewriting_decode(entry, *args, **kwargs):  # type: ignore[no-untyped-def]
        if entry.path == str(before_read):  # rewritten after discovery, before it is read
            make_image(before_read, (0, 0, 200), size=(80, 60))
        result = real_decode(entry, *args, **kwargs)
        if entry.path == str(after_read):  # rewritten after it was read
            make_image(after_read, (0, 0, 200), size=(80, 60))
        return result

    monkeypatch.setattr(indexer, "decode_file", rewriting_decode)
    base = ["--home", str(home), "--model", str(tiny_model), "--workers", "0"]
    first = runner.invoke(app, [*base, "index", "--quiet", "--json", str(root)])
    assert json.loads(first.stdout.splitlines()[-1])["added"] == 2
    monkeypatch.undo()
    # the catalog records size and mtime as they were when the bytes were read, so
    # the file rewritten after its read is seen as changed; the other is current
    second = runner.invoke(app, [*base, "index", "--quiet", "--json", str(root)])
    counts = json.loads(second.stdout.splitlines()[-1])
    assert (counts["unchanged"], counts["updated"]) == (1, 1)
    with Catalog.open(home / "catalog.sqlite3", create=False) as catalog:
        vectors = catalog.vectors("image", catalog.ids("image").tolist(), 32)
    a, b = vectors.values()
    np.testing.assert_allclose(a, b, atol=1e-6)  # both now hold the blue picture's vector
