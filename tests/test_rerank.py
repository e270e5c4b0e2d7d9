"""The rerank stage: identity at initialisation, index-time token storage, search --rerank."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.rerank import CrossAttentionScorer, TokenStore, save_scorer


def run(home: Path, model: Path, *args: str):
    result = CliRunner().invoke(app, ["--home", str(home), "--model", str(model), *args], catch_exceptions=False)
    return result


def lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_untrained_scorer_correction_is_exactly_zero() -> None:
    torch.manual_seed(0)
    scorer = CrossAttentionScorer(16)
    out = scorer(torch.randn(5, 7, 16), torch.ones(5, 7, dtype=torch.bool), torch.randn(5, 9, 16))
    assert out.shape == (5,)
    assert torch.equal(out, torch.zeros(5))


#: A tiny open_clip ModifiedResNet CLIP: its last feature map is 2×2 cells, the re-ranker's 4 image tokens.
TINY_RESNET_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def untrained_rerank_resnet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import TINY_PREPROCESS, save_tiny_model

    folder = save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-resnet-rerank", cfg=TINY_RESNET_CFG)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["preprocess_cfg"] = {**TINY_PREPROCESS, "size": 64}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(3)
    save_scorer(CrossAttentionScorer(32), folder)
    return folder


def test_resnet_tokens_are_its_attention_pools_values() -> None:
    import open_clip

    from mmsearch.towers import image_token_states

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_RESNET_CFG).eval()
    pixels = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        pooled, tokens = image_token_states(model, pixels)
        assert tokens.shape == (3, 4, 32)
        torch.testing.assert_close(pooled, model.encode_image(pixels))
        # with every cell alike and no positions, attention has nothing to choose: each token is the pooled output
        pool = model.visual.attnpool
        pool.positional_embedding.zero_()
        model.visual.layer4.register_forward_hook(lambda m, i, out: out.mean((2, 3), keepdim=True).expand_as(out))
        pooled, tokens = image_token_states(model, pixels)
        for cell in range(4):
            torch.testing.assert_close(tokens[:, cell], pooled)


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_untrained_reranker_keeps_dual_encoder_ranking(tower: str, request: pytest.FixtureRequest, photo_dir: Path,
                                                       home: Path, tmp_path: Path) -> None:
    untrained_rerank_model = request.getfixturevalue(
        "untrained_rerank_model" if tower == "vit" else "untrained_rerank_resnet")
    assert run(home, untrained_rerank_model, "index", str(photo_dir), "--quiet").exit_code == 0
    corpus = tmp_path / "texts.txt"
    corpus.write_text("a red picture\na green picture\na blue picture\nsomething yellow\nblack\nwhite\n")
    assert run(home, untrained_rerank_model, "add-texts", str(corpus), "--quiet").exit_code == 0

    plain = lines(run(home, untrained_rerank_model, "search", "red", "--json").stdout)
    reranked = run(home, untrained_rerank_model, "search", "red", "--json", "--rerank", "--rerank-k", "4")
    assert reranked.exit_code == 0, reranked.output
    reranked = lines(reranked.stdout)
    assert [h["id"] for h in reranked] == [h["id"] for h in plain]
    assert [h["score"] for h in reranked] == pytest.approx([h["score"] for h in plain], abs=1e-5)
    assert all("dual_score" in h for h in reranked[:4])

    query = str(photo_dir / "green.png")
    plain = lines(run(home, untrained_rerank_model, "search", "--image", query, "--texts", "--json").stdout)
    reranked = lines(run(home, untrained_rerank_model, "search", "--image", query, "--texts", "--rerank", "--json").stdout)
    assert [h["id"] for h in reranked] == [h["id"] for h in plain]
    assert [h["score"] for h in reranked] == pytest.approx([h["score"] for h in plain], abs=1e-5)


def test_tokens_are_stored_at_index_time_and_shared_by_copies(untrained_rerank_model: Path, photo_dir: Path, home: Path) -> None:
    assert run(home, untrained_rerank_model, "index", str(photo_dir), "--quiet").exit_code == 0
    store = TokenStore.open(home, f"local-dir:{untrained_rerank_model.resolve()}") or TokenStore.open(
        home, json.loads((home / "rerank" / "tokens.json").read_text())["model"]
    )
    assert store is not None
    # 32 px / patch 8 = 16 patch tokens of 32 dims, float16
    assert (store.tokens, store.dim) == (16, 32)
    assert (home / "rerank" / "tokens.f16").stat().st_size == 6 * 16 * 32 * 2
    shutil.copy(photo_dir / "red.jpg", photo_dir / "red copy.jpg")
    assert run(home, untrained_rerank_model, "index", str(photo_dir), "--quiet").exit_code == 0
    assert (home / "rerank" / "tokens.f16").stat().st_size == 6 * 16 * 32 * 2  # same content, same row
    result = run(home, untrained_rerank_model, "search", "red", "--rerank", "--json", "-k", "7")
    assert result.exit_code == 0
    assert len(lines(result.stdout)) == 7


def test_token_store_round_trip_and_torn_tail(tmp_path: Path) -> None:
    store = TokenStore.open(tmp_path, "m", (4, 8))
    assert store is not None
    a = np.arange(2 * 4 * 8, dtype=np.float16).reshape(2, 4, 8)
    store.add(["h1", "h2"], a)
    store.add(["h2", "h3"], a)  # h2 is kept, h3 appended
    with open(tmp_path / "rerank" / "tokens.f16", "ab") as f:
        f.write(b"\0" * 10)  # an interrupted write
    again = TokenStore.open(tmp_path, "m")
    got = again.get(["h1", "h3", "missing"])
    assert np.array_equal(got[0], a[0]) and np.array_equal(got[1], a[1]) and got[2] is None
    assert TokenStore.open(tmp_path, "another model") is None


def test_rerank_errors_are_one_line(tiny_model: Path, untrained_rerank_model: Path, photo_dir: Path, tmp_path: Path) -> None:
    plain_home = tmp_path / "plain"
    assert run(plain_home, tiny_model, "index", str(photo_dir), "--quiet").exit_code == 0
    result = run(plain_home, tiny_model, "search", "red", "--rerank")
    assert result.exit_code != 0 and "has no re-ranker" in result.stderr

    home = tmp_path / "home"
    assert run(home, untrained_rerank_model, "index", str(photo_dir), "--quiet").exit_code == 0
    result = run(home, untrained_rerank_model, "search", "red + blue", "--rerank")
    assert result.exit_code != 0 and "plain text query" in result.stderr


def test_scorer_save_load_round_trip(tmp_path: Path) -> None:
    from mmsearch.rerank import RERANKER_WEIGHTS, load_scorer

    torch.manual_seed(1)
    scorer = CrossAttentionScorer(16)
    torch.nn.init.normal_(scorer.head.weight)  # as if trained: non-zero corrections
    save_scorer(scorer, tmp_path)
    assert (tmp_path / RERANKER_WEIGHTS).read_bytes()[:8] != b"\x80\x02\x8a\x0a"  # safetensors, not a pickle
    loaded = load_scorer(tmp_path)
    args = (torch.randn(3, 5, 16), torch.ones(3, 5, dtype=torch.bool), torch.randn(3, 4, 16))
    with torch.no_grad():
        assert torch.equal(scorer.eval()(*args), loaded(*args))
        assert not torch.equal(loaded(*args), torch.zeros(3))


def test_rerank_query_shares_one_encoder_pass(untrained_rerank_model: Path, photo_dir: Path, home: Path) -> None:
    """The re-rank path's one-pass query vectors equal the plain search's query vectors."""
    from mmsearch.home import Home
    from mmsearch.rerank import TextStates
    from mmsearch.search import rerank_query
    from mmsearch.search import query_vector
    from mmsearch.settings import resolve

    assert run(home, untrained_rerank_model, "index", str(photo_dir), "--quiet").exit_code == 0
    with Home.open(resolve(home=home, model=str(untrained_rerank_model)), create=False) as h:
        vector, states = rerank_query(h, "a red picture", None, "image")
        assert isinstance(states, TextStates) and states.states.shape[0] == 1
        np.testing.assert_allclose(vector, query_vector(h, "a red picture", None), atol=1e-5)
        image = photo_dir / "green.png"
        vector, tokens = rerank_query(h, None, image, "text")
        np.testing.assert_allclose(vector, query_vector(h, None, image), atol=1e-5)
        assert tokens.ndim == 2 and tokens.shape[1] == 32


def test_reranker_kept_for_one_direction_leaves_the_other_to_the_dual_encoder(
        tiny_model: Path, photo_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "one-way"
    shutil.copytree(tiny_model, folder)
    torch.manual_seed(5)
    scorer = CrossAttentionScorer(32)
    torch.nn.init.normal_(scorer.head.weight, std=5.0)  # a re-ranker that does change the scores
    save_scorer(scorer, folder, {"directions": ["text_to_image"]})
    home = tmp_path / "home"
    assert run(home, folder, "index", str(photo_dir), "--quiet").exit_code == 0
    corpus = tmp_path / "texts.txt"
    corpus.write_text("a red picture\na green picture\na blue picture\nsomething yellow\nblack\nwhite\n")
    assert run(home, folder, "add-texts", str(corpus), "--quiet").exit_code == 0

    plain = lines(run(home, folder, "search", "red", "--json").stdout)
    reranked = lines(run(home, folder, "search", "red", "--json", "--rerank").stdout)
    assert [h["score"] for h in reranked] != pytest.approx([h["score"] for h in plain], abs=1e-4)

    query = str(photo_dir / "green.png")
    plain = lines(run(home, folder, "search", "--image", query, "--texts", "--json").stdout)
    reranked = lines(run(home, folder, "search", "--image", query, "--texts", "--rerank", "--json").stdout)
    assert [h["id"] for h in reranked] == [h["id"] for h in plain]
    assert [h["score"] for h in reranked] == pytest.approx([h["score"] for h in plain], abs=1e-5)
