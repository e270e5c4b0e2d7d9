from pathlib import Path

import numpy as np
from PIL import Image

from mmsearch.decode import Decoded, Skipped, decode_file, decode_many, load_image
from mmsearch.discover import FileEntry


def _entry(path: Path) -> FileEntry:
    st = path.stat()
    return FileEntry(str(path), st.st_size, st.st_mtime_ns)


def test_exif_orientation_is_applied(tmp_path: Path):
    # a picture that is wide when upright, stored tall with "rotate 90" in EXIF
    upright = Image.new("RGB", (40, 20), (255, 0, 0))
    upright.paste((0, 0, 255), (0, 0, 10, 20))  # blue band on the left
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    stored.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    img = load_image(str(tmp_path / "rotated.jpg"))
    assert img.size == (40, 20)
    left, right = np.asarray(img)[10, 2], np.asarray(img)[10, 37]
    assert left[2] > 200 and left[0] < 60  # blue on the left, as it was shot
    assert right[0] > 200 and right[2] < 60


def test_transparency_is_laid_over_white(tmp_path: Path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert np.asarray(load_image(str(tmp_path / "clear.png"))).min() == 255


def test_jpeg_draft_keeps_at_least_the_model_size(tmp_path: Path):
    Image.new("RGB", (1600, 1200), "green").save(tmp_path / "big.jpg")
    img = load_image(str(tmp_path / "big.jpg"), min_side=224)
    assert min(img.size) >= 224 and img.size[0] < 1600


def test_bad_files_are_skipped_with_a_reason(tmp_path: Path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello, I am not a JPEG")
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), "red").save(good)
    data = good.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    results = {
        Path(r.entry.path if isinstance(r, Decoded) else r.path).name: r
        for r in (decode_file(_entry(p), lambda im: np.asarray(im), 16) for p in sorted(tmp_path.iterdir()))
    }
    assert isinstance(results["good.png"], Decoded) and results["good.png"].pixels.shape == (16, 16, 3)
    for name in ("empty.jpg", "text.jpg", "truncated.png"):
        assert isinstance(results[name], Skipped), name
        assert results[name].reason and "\n" not in results[name].reason


def test_known_content_is_not_decoded(tmp_path: Path):
    path = tmp_path / "a.png"
    Image.new("RGB", (16, 16), "red").save(path)
    first = decode_file(_entry(path), lambda im: im, 16)
    again = decode_file(_entry(path), lambda im: im, 16, reusable={first.content_hash}.__contains__)
    assert again.content_hash == first.content_hash and again.pixels is None


def test_decode_many_keeps_order(tmp_path: Path):
    out = list(decode_many(range(100), lambda i: i * 2, workers=3, window=7))
    assert out == [i * 2 for i in range(100)]


def test_heic_is_read_through_the_optional_extra(tmp_path: Path):
    pillow_heif = __import__("pytest").importorskip("pillow_heif")
    from mmsearch.decode import enable_heif

    pillow_heif.register_heif_opener()
    Image.new("RGB", (64, 48), (200, 20, 20)).save(tmp_path / "phone.heic", format="HEIF")
    assert enable_heif()
    img = load_image(str(tmp_path / "phone.heic"))
    assert img.size == (64, 48) and np.asarray(img)[24, 32, 0] > 150


def test_png_with_text_chunks_over_pillows_cap_is_decoded(tmp_path: Path):
    from PIL import PngImagePlugin

    from mmsearch.decode import strip_png_metadata

    cap = PngImagePlugin.MAX_TEXT_CHUNK
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "a" * (2 * cap), zip=True)  # zTXt: tiny on disk, over the cap unpacked
    info.add_itxt("XML:com.adobe.xmp", "b" * (2 * cap), zip=True)  # iTXt, compressed
    picture = Image.new("RGB", (24, 16), (10, 200, 30))
    path = tmp_path / "metadata.png"
    picture.save(path, pnginfo=info)
    try:
        with Image.open(path) as img:
            img.load()
        raise AssertionError("Pillow now reads this file as it is; the test no longer covers the fallback")
    except ValueError as exc:
        assert "MAX_TEXT_CHUNK" in str(exc)
    result = decode_file(_entry(path), lambda im: np.asarray(im), 16)
    assert isinstance(result, Decoded) and (result.width, result.height) == (24, 16)
    assert np.array_equal(result.pixels, np.asarray(picture))
    assert PngImagePlugin.MAX_TEXT_CHUNK == cap  # no module state was changed for it
    plain = tmp_path / "plain.png"
    picture.save(plain)
    assert strip_png_metadata(plain.read_bytes()) is None  # nothing to drop: no copy made
