"""``mmsearch duplicates``: exact groups are byte-identical, near groups come from vector pairs, no chaining."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.duplicates import leader_groups, similar_pairs

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def with_copies(photo_dir: Path) -> Path:
    shutil.copy(photo_dir / "red.jpg", photo_dir / "nested" / "red copy.jpg")
    shutil.copy(photo_dir / "red.jpg", photo_dir / "with space" / "red-again.jpg")
    shutil.copy(photo_dir / "green.png", photo_dir / "green2.png")
    return photo_dir


def groups_of(result) -> list[dict]:
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_exact_groups_json_contract(base, with_copies):
    run(*base, "index", with_copies, "-q")
    groups = groups_of(run(*base, "duplicates", "--kind", "exact", "--json"))
    assert [g["kind"] for g in groups] == ["exact", "exact"]
    assert all(g["score"] == 1.0 and set(g) == {"kind", "score", "items"} for g in groups)
    paths = [{item["path"] for item in g["items"]} for g in groups]
    assert paths == [
        {str(with_copies / "red.jpg"), str(with_copies / "nested" / "red copy.jpg"), str(with_copies / "with space" / "red-again.jpg")},
        {str(with_copies / "green.png"), str(with_copies / "green2.png")},
    ]
    assert all(isinstance(item["id"], int) for g in groups for item in g["items"])


def test_exact_group_never_holds_a_file_whose_bytes_changed(base, with_copies):
    run(*base, "index", with_copies, "-q")
    # changed after indexing: the catalog's hash is stale, the bytes are not the same any more
    changed = with_copies / "nested" / "red copy.jpg"
    changed.write_bytes(changed.read_bytes()[:-1] + b"\x00")
    (with_copies / "green2.png").unlink()
    groups = groups_of(run(*base, "duplicates", "--kind", "exact", "--json"))
    assert [sorted(i["path"] for i in g["items"]) for g in groups] == [
        sorted([str(with_copies / "red.jpg"), str(with_copies / "with space" / "red-again.jpg")])
    ]


def test_near_finds_copies_and_readable_list(base, with_copies):
    run(*base, "index", with_copies, "-q")
    near = groups_of(run(*base, "duplicates", "--json", "--threshold", "0.9999"))
    assert {len(g["items"]) for g in near} == {3, 2} and all(g["kind"] == "near" for g in near)
    assert all(g["score"] >= 0.9999 for g in near)
    text = run(*base, "duplicates", "--threshold", "0.9999")
    assert text.exit_code == 0 and "group 1  near" in text.stdout and "red copy.jpg" in text.stdout
    everything = groups_of(run(*base, "duplicates", "--kind", "similar", "--threshold", "-1", "--json"))
    assert sum(len(g["items"]) for g in everything) == 9  # at -1 every image pairs with the first leader
    assert len(everything) == 1


def test_no_duplicates_and_bad_options(base, photo_dir):
    run(*base, "index", photo_dir, "-q")
    none = run(*base, "duplicates", "--kind", "exact")
    assert none.exit_code == 0 and none.stdout == "" and none.stderr.strip() == "no exact duplicates"
    bad = run(*base, "duplicates", "--kind", "fuzzy")
    assert bad.exit_code == 2 and bad.stderr.strip().splitlines() == ["error: --kind must be one of exact, near, similar, got 'fuzzy'"]
    assert "between -1 and 1" in run(*base, "duplicates", "--threshold", "1.5").stderr
    assert "not exact" in run(*base, "duplicates", "--kind", "exact", "--threshold", "0.9").stderr


def test_duplicates_on_a_missing_home_is_one_line(home):
    result = run("--home", home, "duplicates")
    assert result.exit_code == 1 and result.stderr.startswith("error: no catalog")


def _unit(rows: list[list[float]]) -> np.ndarray:
    v = np.array(rows, dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_similar_pairs_is_every_pair_above_threshold_once():
    rng = np.random.default_rng(0)
    vectors = _unit(rng.normal(size=(300, 8)).tolist())
    first, second, scores = similar_pairs(vectors, 0.8)
    sims = vectors @ vectors.T
    want = {(i, j) for i in range(300) for j in range(i + 1, 300) if sims[i, j] >= 0.8}
    assert set(zip(first.tolist(), second.tolist())) == want and len(first) == len(want)
    assert np.allclose(scores, sims[first, second], atol=1e-5)


def test_similar_pairs_above_the_exact_size_uses_ivf_and_finds_planted_copies(monkeypatch):
    import mmsearch.duplicates as dup

    monkeypatch.setattr(dup, "EXACT_MAX", 100)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 32)).astype(np.float32)
    copies = vectors[:50] + 0.05 * rng.normal(size=(50, 32)).astype(np.float32)
    both = np.concatenate([vectors, copies])
    both /= np.linalg.norm(both, axis=1, keepdims=True)
    first, second, _ = similar_pairs(both, 0.95)
    assert {(i, i + 3000) for i in range(50)} <= set(zip(first.tolist(), second.tolist()))


def test_leader_groups_do_not_chain():
    # 0~1 (0.97), 1~2 (0.96), but 0 and 2 are not within the threshold of each other
    groups = leader_groups(4, np.array([0, 1]), np.array([1, 2]), np.array([0.97, 0.96]))
    assert groups == [([0, 1], pytest.approx(0.97))]
    # a star: the leader takes all, the group's score is its weakest pair
    star = leader_groups(4, np.array([0, 0, 0]), np.array([1, 2, 3]), np.array([0.99, 0.96, 0.98]))
    assert star == [([0, 1, 3, 2], pytest.approx(0.96))]
    assert leader_groups(3, np.zeros(0, int), np.zeros(0, int), np.zeros(0)) == []


def test_pixel_similarity_sees_through_reencoding_brightness_and_crops_not_other_pictures(tmp_path):
    from PIL import Image, ImageEnhance

    from mmsearch.duplicates import pixel_similarity

    images = sorted(Path(__file__).resolve().parent.parent.glob("data/twemoji/images/*.png"))
    source, other = images[10], images[200]
    img = Image.open(source).convert("RGBA")
    flat = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img).convert("RGB")
    w, h = flat.size
    variants = {
        "jpeg60.jpg": flat,
        "darker.png": ImageEnhance.Brightness(flat).enhance(0.75),
        "crop.png": flat.crop((3, 2, w - 2, h - 3)),
        "small.png": flat.resize((w // 2, h // 2)),
    }
    paths = [str(source)]
    for name, picture in variants.items():
        picture.save(tmp_path / name, quality=60)
        paths.append(str(tmp_path / name))
    paths += [str(other), str(tmp_path / "missing.png")]
    first = np.zeros(len(paths) - 1, dtype=np.int64)
    second = np.arange(1, len(paths))
    scores = pixel_similarity(paths, first, second)
    assert (scores[:4] >= 0.95).all(), scores
    assert scores[4] < 0.9 and scores[5] == -1.0
