"""A CoCa model re-ranks with its own captioning decoder: log p(text | image) fused with the dual score."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmsearch.cli import app
from conftest import TINY_COCA_CFG
from test_train import shapes_pairs  # noqa: F401  (a module fixture: 32 generated pairs)

TEXTS = "a red picture\na green picture\nblue\nsomething yellow\nblack\nwhite\n"


def run(home: Path, model: Path, *args: str):
    return CliRunner().invoke(app, ["--home", str(home), "--model", str(model), *args], catch_exceptions=False)


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def open_clip_log_likelihood(model, image_latent: torch.Tensor, image_embs: torch.Tensor, texts: list[str]) -> np.ndarray:
    """The reference: open_clip's own CoCa forward (padded, teacher-forced) given the image's tokens."""
    import open_clip

    tokens = open_clip.get_tokenizer("coca_ViT-B-32")(texts)
    with torch.no_grad():
        out = model(None, tokens, image_latent=image_latent, image_embs=image_embs)
    logp = torch.log_softmax(out["logits"].float(), -1).gather(-1, out["labels"].unsqueeze(-1)).squeeze(-1)
    return (logp * (out["labels"] != 0)).sum(-1).numpy()


@pytest.fixture
def coca_home(tiny_coca: Path, photo_dir: Path, home: Path, tmp_path: Path) -> Path:
    assert run(home, tiny_coca, "index", str(photo_dir), "--quiet").exit_code == 0
    corpus = tmp_path / "texts.txt"
    corpus.write_text(TEXTS)
    assert run(home, tiny_coca, "add-texts", str(corpus), "--quiet").exit_code == 0
    return home


def test_decoder_projection_is_random_so_the_test_can_fail(tiny_coca: Path) -> None:
    from safetensors.torch import load_file

    projection = load_file(tiny_coca / "open_clip_model.safetensors")["text_decoder.text_projection"]
    assert projection.abs().sum() > 0


def test_log_likelihood_matches_open_clip_forward() -> None:
    """Cut to the real length, from the towers' pieces: the same numbers as CoCa's padded forward."""
    import open_clip

    from mmsearch.towers import caption_log_likelihood, coca_text_states, image_token_states

    torch.manual_seed(0)
    model = open_clip.CoCa(**{k: v for k, v in TINY_COCA_CFG.items() if k != "custom_text"}).eval()
    torch.nn.init.normal_(model.text_decoder.text_projection, std=0.5)
    pixels = torch.randn(3, 3, 32, 32)
    texts = ["a cat", "a dog on a mat", "x"]
    with torch.no_grad():
        latent, embs = model._encode_image(pixels)
        pooled, tokens = image_token_states(model, pixels)
        states, cut = coca_text_states(model, open_clip.get_tokenizer("coca_ViT-B-32")(texts))
        ours = caption_log_likelihood(model, tokens, states, cut).numpy()
    np.testing.assert_allclose(torch.nn.functional.normalize(pooled, dim=-1), latent, atol=1e-5)
    np.testing.assert_allclose(ours, open_clip_log_likelihood(model, latent, embs, texts), rtol=1e-4, atol=1e-3)
    assert len(set(np.round(ours, 3))) == 3  # a random decoder tells texts apart


def test_search_rerank_both_directions_uses_the_decoder(tiny_coca: Path, coca_home: Path, photo_dir: Path) -> None:
    """search --rerank on a CoCa: dual score + log p(text|image) / logit_scale, checked against open_clip."""
    from mmsearch.encode import load_encoder
    from mmsearch.rerank import TokenStore

    plain = lines(run(coca_home, tiny_coca, "search", "red", "--json").stdout)
    result = run(coca_home, tiny_coca, "search", "red", "--json", "--rerank")
    assert result.exit_code == 0, result.output
    reranked = lines(result.stdout)
    assert sorted(h["id"] for h in reranked) == sorted(h["id"] for h in plain)

    encoder = load_encoder(str(tiny_coca), "cpu")
    model, scale = encoder.model, float(encoder.model.logit_scale.detach().exp())
    store = TokenStore.open(coca_home, encoder.spec.canonical)
    assert store is not None and (store.tokens, store.dim) == (8, 32)  # 9 pooler queries, one for the vector
    from mmsearch.home import Home
    from mmsearch.settings import resolve

    with Home.open(resolve(home=coca_home, model=str(tiny_coca)), create=False) as h:
        hashes = h.catalog.image_hashes([int(x["id"]) for x in reranked])
    embs = torch.from_numpy(np.stack([store.get([hashes[int(x["id"])]])[0] for x in reranked]).astype(np.float32))
    reference = open_clip_log_likelihood(model, torch.zeros(len(reranked), 32), embs, ["red"] * len(reranked))
    expected = np.array([x["dual_score"] for x in reranked]) + reference / scale
    np.testing.assert_allclose([x["score"] for x in reranked], expected, rtol=1e-4, atol=1e-4)
    assert [x["score"] for x in reranked] == sorted((x["score"] for x in reranked), reverse=True)
    assert [x["id"] for x in reranked] != [x["id"] for x in plain]  # the decoder moved something

    query = photo_dir / "green.png"
    result = run(coca_home, tiny_coca, "search", "--image", str(query), "--texts", "--json", "--rerank")
    assert result.exit_code == 0, result.output
    hits = lines(result.stdout)
    assert len(hits) == 6 and all("dual_score" in x for x in hits)
    image_tokens = torch.from_numpy(store.get([hashes[next(int(x["id"]) for x in reranked if x["path"].endswith("green.png"))]])[0].astype(np.float32))
    reference = open_clip_log_likelihood(model, torch.zeros(6, 32), image_tokens[None].expand(6, -1, -1), [x["text"] for x in hits])
    np.testing.assert_allclose([x["score"] for x in hits], np.array([x["dual_score"] for x in hits]) + reference / scale, rtol=1e-3, atol=2e-3)


def test_weight_zero_is_exactly_the_dual_encoder(tiny_coca: Path, photo_dir: Path, tmp_path: Path) -> None:
    from mmsearch.rerank import save_caption_weights

    model = tmp_path / "coca-off"
    shutil.copytree(tiny_coca, model)
    save_caption_weights(model, {"text_to_image": 0.0, "image_to_text": 0.0})
    home = tmp_path / "home"
    assert run(home, model, "index", str(photo_dir), "--quiet").exit_code == 0
    (tmp_path / "t.txt").write_text(TEXTS)
    assert run(home, model, "add-texts", str(tmp_path / "t.txt"), "--quiet").exit_code == 0
    for args in (["search", "red"], ["search", "--image", str(photo_dir / "red.jpg"), "--texts"]):
        plain = lines(run(home, model, *args, "--json").stdout)
        reranked = lines(run(home, model, *args, "--json", "--rerank").stdout)
        assert [h["id"] for h in reranked] == [h["id"] for h in plain]
        assert [h["score"] for h in reranked] == pytest.approx([h["score"] for h in plain], abs=1e-5)


def test_eval_rerank_with_coca(tiny_coca: Path, shapes_pairs: Path, tmp_path: Path) -> None:  # noqa: F811
    """eval --rerank runs the decoder over every query's candidates; its table agrees with score()."""
    result = CliRunner().invoke(
        app, ["--model", str(tiny_coca), "eval", str(shapes_pairs), "--rerank", "--json", "--quiet"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = lines(result.stdout)[0]
    assert out["rerank"] is True and set(out["text_to_image"]) == {"R@1", "R@5", "R@10"}

    from mmsearch.encode import load_encoder
    from mmsearch.rerank import CaptionReranker

    encoder = load_encoder(str(tiny_coca), "cpu")
    reranker = CaptionReranker(encoder, {"text_to_image": 1.0, "image_to_text": 1.0})
    torch.manual_seed(0)
    images = torch.randn(4, 8, 32)
    texts = ["a red square", "a blue circle on white", "bar"]
    table = reranker.log_likelihood_table(texts, images, text_queries=True)
    got = table(np.array([1]), np.array([[3, 0, 2]]))[0]
    dual = [{"id": i, "score": 0.0, "tokens": images[i].numpy()} for i in (3, 0, 2)]
    np.testing.assert_allclose(got / reranker.scale, reranker.score(texts[1], dual), rtol=1e-4, atol=1e-5)


def test_train_fits_the_fusion_of_a_coca(tiny_coca: Path, shapes_pairs: Path, tmp_path: Path) -> None:  # noqa: F811
    from mmsearch.rerank import RERANKER_CONFIG, RERANKER_WEIGHTS
    from mmsearch.train import TrainOptions, best_fusion_weight, train

    out = tmp_path / "coca-fitted"
    report = train(
        TrainOptions(pairs=shapes_pairs, out=out, base=str(tiny_coca), epochs=1, batch_size=8, val_fraction=0.25),
        progress=False, say=lambda _: None,
    )
    config = json.loads((out / RERANKER_CONFIG).read_text())
    assert config["kind"] == "coca-caption" and not (out / RERANKER_WEIGHTS).exists()
    for d in ("text_to_image", "image_to_text"):
        assert config[d] in (0.0, config["fitted"][d])
        if report.val_rerank[d]["R@1"] < report.val_dual[d]["R@1"]:
            assert config[d] == 0.0  # a fusion that lowers validation R@1 is not kept
    assert "CoCa fusion weights fitted" in report.message
    result = run(tmp_path / "home", out, "index", str(shapes_pairs.parent / "img"), "--quiet")
    assert result.exit_code == 0
    assert run(tmp_path / "home", out, "search", "a red square", "--rerank").exit_code == 0

    # the fit picks the weight that puts a right candidate first most often
    dual = np.array([[0.5, 0.4], [0.5, 0.4]])
    loglik = np.array([[-10.0, -2.0], [-3.0, -2.5]])
    hit = np.array([[False, True], [True, False]])
    assert best_fusion_weight(dual, loglik, hit, scale=10.0, grid=(0.0, 0.5, 5.0)) == 0.5
    assert best_fusion_weight(dual, loglik, np.array([[True, False], [True, False]]), 10.0, (0.0, 5.0)) == 0.0


def test_which_models_rerank_is_known_from_the_spec(tiny_coca: Path, tiny_model: Path, untrained_rerank_model: Path) -> None:
    from mmsearch.modelspec import parse
    from mmsearch.rerank import spec_has_reranker

    assert spec_has_reranker(parse("coca_ViT-B-32:laion2b_s13b_b90k"))
    assert spec_has_reranker(parse("coca_ViT-L-14:laion2b_s13b_b90k"))
    assert not spec_has_reranker(parse("ViT-B-32:laion2b_s34b_b79k"))
    assert spec_has_reranker(parse(str(tiny_coca)))
    assert spec_has_reranker(parse(str(untrained_rerank_model)))
    assert not spec_has_reranker(parse(str(tiny_model)))
