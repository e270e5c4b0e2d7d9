"""The exemplar memory: training pictures per caption, fitted on a leave-one-out validation, used by --rerank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.errors import RerankerUnavailableError
from mmsearch.evaluate import positive_ranks, recalls
from mmsearch.exemplars import (
    EXEMPLAR_CONFIG, EXEMPLAR_WEIGHTS, ExemplarMemory, caption_key, fit_weights, leave_one_out_table, unrelated_mean,
)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def run(home: Path, model: Path, *args: str):
    return CliRunner().invoke(app, ["--home", str(home), "--model", str(model), *args], catch_exceptions=False)


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_memory_averages_each_captions_pictures_and_matches_case_and_spacing() -> None:
    images = unit(np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]], dtype=np.float32))
    memory = ExemplarMemory.build(["A Cat", "a  cat", "a dog"], images, [(0, 0), (1, 1), (2, 2)])
    assert memory.captions == ["a cat", "a dog"]
    assert np.allclose(memory.vectors[0], unit(images[0] + images[1]))
    assert memory.rows(["a cat", "A DOG ", "a bird"]).tolist() == [0, 1, -1]
    assert caption_key("  Red\tFlag ") == "red flag"
    assert not memory.active  # built with weight 0: the plain ranking
    assert np.array_equal(memory.text_to_image("a cat", images), np.zeros(3, dtype=np.float32))


def test_the_expanded_query_ranks_every_image_as_re_scoring_each_would() -> None:
    rng = np.random.default_rng(1)
    images = unit(rng.normal(size=(200, 16)))
    memory = ExemplarMemory.build(["a cat", "a dog"], images[:4], [(0, 0), (1, 0), (2, 1), (3, 1)])
    memory.weights = {"text_to_image": 3.0, "image_to_text": 0.0}
    memory.offset = 0.1
    query = unit(rng.normal(size=16))
    expanded = memory.expanded_query("A  Cat", query)
    assert expanded is not None
    re_scored = images @ query + memory.text_to_image("a cat", images)
    assert np.argsort(-(images @ expanded)).tolist() == np.argsort(-re_scored).tolist()
    assert np.allclose(images @ expanded - 3.0 * 0.1, re_scored, atol=1e-5)
    assert memory.expanded_query("a bird", query) is None  # not a training caption: the plain query
    memory.weights["text_to_image"] = 0.0
    assert memory.expanded_query("a cat", query) is None


def test_leave_one_out_compares_a_picture_with_its_captions_other_pictures_only() -> None:
    rng = np.random.default_rng(0)
    images = unit(rng.normal(size=(5, 8)))
    links = [(0, 0), (1, 0), (2, 0), (3, 1), (4, 2)]  # caption 0 has three pictures, 1 and 2 one each
    table = leave_one_out_table(["a", "b", "c"], images, links)
    assert table[0, 1] == pytest.approx(float(unit(images[[0, 2]].mean(0)) @ images[1]), abs=1e-6)
    assert table[0, 3] == pytest.approx(float(unit(images[[0, 1, 2]].mean(0)) @ images[3]), abs=1e-6)
    assert table[1, 3] == 0.0  # no other picture of "b": no exemplar for its own picture
    assert table[1, 4] == pytest.approx(float(images[3] @ images[4]), abs=1e-6)


def test_fit_keeps_zero_unless_a_weight_raises_recall_at_1() -> None:
    # two captions, two pictures each; the text vectors point the wrong way, the pictures agree by caption
    images = unit(np.array([[1, 0.1, 0], [1, -0.1, 0], [0, 1, 0.1], [0, 1, -0.1]], dtype=np.float32))
    texts = unit(np.array([[0.2, 1, 0], [1, 0.2, 0]], dtype=np.float32))
    links = [(0, 0), (1, 0), (2, 1), (3, 1)]
    positives = np.zeros((2, 4), dtype=bool)
    for i, j in links:
        positives[j, i] = True
    sims = texts @ images.T
    table = leave_one_out_table(["x", "y"], images, links)

    def score(direction, corrections):
        if direction == "text_to_image":
            return recalls(positive_ranks(sims, positives, corrections))["R@1"]
        return recalls(positive_ranks(np.ascontiguousarray(sims.T), np.ascontiguousarray(positives.T), corrections))["R@1"]

    weights, tried = fit_weights(table, score)
    assert tried["text_to_image"][0.0] == 0.0 and weights["text_to_image"] > 0
    assert tried["text_to_image"][weights["text_to_image"]] == 1.0
    # a table that says nothing never wins a weight
    weights, _ = fit_weights(np.zeros_like(table), score)
    assert weights == {"text_to_image": 0.0, "image_to_text": 0.0}
    # the offset: the mean over pictures that are not the caption's
    assert unrelated_mean(table, links) == pytest.approx(float(table[[0, 0, 1, 1], [2, 3, 0, 1]].mean()))


def test_save_load_round_trip_and_bad_files_fail_in_one_line(tmp_path: Path) -> None:
    images = unit(np.eye(3, dtype=np.float32))
    memory = ExemplarMemory.build(["a", "b", "c"], images, [(0, 0), (1, 1), (2, 2)])
    memory.weights = {"text_to_image": 2.0, "image_to_text": 0.5}
    memory.offset = 0.25
    memory.save(tmp_path)
    again = ExemplarMemory.load(tmp_path)
    assert again is not None and again.captions == memory.captions and again.weights == memory.weights
    assert again.offset == 0.25
    # a known caption gains w × (cos - offset), an unknown text nothing
    got = again.image_to_text(images[0], ["a", "b", "unknown"])
    assert got.tolist() == pytest.approx([0.5 * 0.75, 0.5 * -0.25, 0.0])
    assert np.array_equal(again.vectors, memory.vectors)
    assert ExemplarMemory.load(tmp_path / "nothing-here") is None
    (tmp_path / EXEMPLAR_CONFIG).write_text(json.dumps({"captions": ["a"], "weights": {}}))
    with pytest.raises(RerankerUnavailableError) as info:
        ExemplarMemory.load(tmp_path)
    assert "\n" not in str(info.value) and "exemplar" in str(info.value)
    (tmp_path / EXEMPLAR_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(RerankerUnavailableError):
        ExemplarMemory.load(tmp_path)


def _remember(folder: Path, pictures: dict[str, Path], weight: float = 100.0) -> None:
    """Give the model in ``folder`` a memory pairing each caption with one picture."""
    from mmsearch.encode import load_encoder
    from mmsearch.search import _image_with_tokens

    encoder = load_encoder(str(folder), "cpu")
    vectors = np.stack([_image_with_tokens(encoder, path)[0] for path in pictures.values()])
    memory = ExemplarMemory.build(list(pictures), vectors, [(i, i) for i in range(len(pictures))])
    memory.weights = {"text_to_image": weight, "image_to_text": weight}
    memory.save(folder)


def test_search_and_eval_rerank_use_the_memory_both_ways(
    untrained_rerank_model: Path, photo_dir: Path, home: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "model"
    shutil.copytree(untrained_rerank_model, folder)  # an untrained re-ranker: the dual-encoder ranking
    assert run(home, folder, "index", str(photo_dir), "--quiet").exit_code == 0
    corpus = tmp_path / "texts.txt"
    corpus.write_text("a red picture\na green picture\na blue picture\nsomething yellow\nblack\nwhite\n")
    assert run(home, folder, "add-texts", str(corpus), "--quiet").exit_code == 0
    plain = lines(run(home, folder, "search", "a red picture", "--json", "-k", "6").stdout)
    last = Path(plain[-1]["path"])  # the picture the dual encoder ranks last for the caption

    _remember(folder, {"a red picture": last})
    reranked = run(home, folder, "search", "a red picture", "--json", "-k", "6", "--rerank")
    assert reranked.exit_code == 0, reranked.output
    reranked = lines(reranked.stdout)
    assert Path(reranked[0]["path"]) == last  # the picture that looks like the caption's exemplar comes first
    assert reranked[0]["score"] > reranked[0]["dual_score"]
    # a query that is not a training caption keeps the dual-encoder ranking
    other_plain = lines(run(home, folder, "search", "something else", "--json", "-k", "6").stdout)
    other = lines(run(home, folder, "search", "something else", "--json", "-k", "6", "--rerank").stdout)
    assert [h["id"] for h in other] == [h["id"] for h in other_plain]

    # the memory reaches past the re-ranked candidates: re-scoring only the dual encoder's best one finds it too
    only_one = lines(run(home, folder, "search", "a red picture", "--json", "-k", "1", "--rerank", "--rerank-k", "1").stdout)
    assert Path(only_one[0]["path"]) == last
    assert only_one[0]["dual_score"] == pytest.approx(plain[-1]["score"], abs=1e-5)
    assert only_one[0]["score"] == pytest.approx(reranked[0]["score"], abs=1e-5)

    texts_plain = lines(run(home, folder, "search", "--image", str(last), "--texts", "--json", "-k", "6").stdout)
    texts = lines(run(home, folder, "search", "--image", str(last), "--texts", "--json", "-k", "6", "--rerank").stdout)
    assert texts[0]["text"] == "a red picture"  # the query image is that caption's exemplar
    assert [h["text"] for h in texts[1:]] == [h["text"] for h in texts_plain if h["text"] != "a red picture"]
    # and past the re-ranked candidates: with only the dual encoder's best text re-scored, the caption still wins
    assert texts_plain[0]["text"] != "a red picture"
    one = lines(run(home, folder, "search", "--image", str(last), "--texts", "--json", "-k", "2", "--rerank",
                    "--rerank-k", "1").stdout)
    assert [h["text"] for h in one] == ["a red picture", texts_plain[0]["text"]]
    assert one[0]["dual_score"] == pytest.approx(next(h["score"] for h in texts_plain if h["text"] == "a red picture"),
                                                 abs=1e-5)


def test_eval_rerank_adds_the_memory(untrained_rerank_model: Path, photo_dir: Path, tmp_path: Path) -> None:
    pictures = {"a red picture": photo_dir / "nested" / "deeper" / "blue.webp", "a scarlet thing": photo_dir / "red.jpg",
                "a pale thing": photo_dir / "white.bmp"}
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"image": str(p), "text": t}) + "\n" for t, p in pictures.items()))
    folder = tmp_path / "model"
    shutil.copytree(untrained_rerank_model, folder)

    def evaluate(name: str, *extra: str) -> dict:
        result = CliRunner().invoke(app, ["--home", str(tmp_path / name), "eval", str(pairs), "--model", str(folder),
                                          "--rerank", "--json", "--quiet", *extra], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])

    without = evaluate("before")
    _remember(folder, pictures)
    remembered = evaluate("after")
    assert remembered["text_to_image"]["R@1"] == remembered["image_to_text"]["R@1"] == 1.0
    assert without["text_to_image"]["R@1"] < 1.0 or without["image_to_text"]["R@1"] < 1.0
    # the memory reaches past the re-ranked candidates both ways, as search does, whatever --rerank-k
    one = evaluate("one", "--rerank-k", "1")
    assert one["text_to_image"]["R@1"] == one["image_to_text"]["R@1"] == 1.0


def test_a_long_lived_library_sees_training_captions_added_after_its_first_search(
    untrained_rerank_model: Path, photo_dir: Path, tmp_path: Path
) -> None:
    from mmsearch.library import Library

    folder = tmp_path / "model"
    shutil.copytree(untrained_rerank_model, folder)
    picture = photo_dir / "red.jpg"
    _remember(folder, {"a scarlet thing": picture})
    with Library.open(tmp_path / "home", model=str(folder)) as library:
        library.add_images([str(photo_dir)], progress=False)
        library.add_texts(["black", "white", "something yellow"])
        before = library.search(image=picture, target="text", k=4, rerank_k=1)
        assert "a scarlet thing" not in [h.text for h in before]
        library.add_texts(["a scarlet thing"])  # a training caption, stored after the memory's map was read
        after = library.search(image=picture, target="text", k=4, rerank_k=1)
        assert after[0].text == "a scarlet thing"
