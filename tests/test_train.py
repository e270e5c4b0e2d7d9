"""Training: a short run on a generated set raises Recall; the model folder round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.evaluate import evaluate
from mmsearch.settings import resolve
from mmsearch.train import TrainOptions, accept_reranker, train

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (240, 230, 20)}
SHAPES = ("square", "circle", "bar", "cross")


def draw(path: Path, colour: tuple[int, int, int], shape: str, shift: int) -> None:
    img = Image.new("RGB", (32, 32), "white")
    d = ImageDraw.Draw(img)
    box = (6 + shift, 6 + shift, 24 + shift, 24 + shift)
    if shape == "square":
        d.rectangle(box, fill=colour)
    elif shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "bar":
        d.rectangle((2, 12 + shift, 30, 18 + shift), fill=colour)
    else:
        d.rectangle((13 + shift, 2, 18 + shift, 30), fill=colour)
        d.rectangle((2, 13 + shift, 30, 18 + shift), fill=colour)
    img.save(path)


@pytest.fixture(scope="module")
def shapes_pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 concepts (colour × shape), 2 drawings each: 32 pairs."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "img").mkdir()
    lines = []
    for colour, rgb in COLOURS.items():
        for shape in SHAPES:
            for shift in (0, 3):
                name = f"img/{colour}-{shape}-{shift}.png"
                draw(root / name, rgb, shape, shift)
                lines.append(json.dumps({"image": name, "text": f"a {colour} {shape}"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return root / "pairs.jsonl"


@pytest.fixture(scope="module")
def trained(shapes_pairs: Path, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("trained") / "model"
    opts = TrainOptions(
        pairs=shapes_pairs, out=out, base=str(tiny_model), epochs=40, batch_size=16, lr=2e-3,
        rerank_epochs=3, negatives=7, val_fraction=0.25,
    )
    report = train(opts, progress=False, say=lambda _: None)
    return out, report.as_dict()


def test_training_raises_recall_over_the_untrained_model(
    trained: tuple[Path, dict], shapes_pairs: Path, tiny_model: Path, tmp_path: Path
) -> None:
    out, report = trained
    before = evaluate(shapes_pairs, resolve(home=tmp_path / "a", model=str(tiny_model)), progress=False)
    after = evaluate(shapes_pairs, resolve(home=tmp_path / "b", model=str(out)), progress=False)
    assert (before["images"], before["texts"]) == (32, 16)
    for direction in ("text_to_image", "image_to_text"):
        gain = sum(after[direction].values()) - sum(before[direction].values())  # R@1 + R@5 + R@10
        assert gain >= 0.3, (before, after)
        assert after[direction]["R@1"] >= before[direction]["R@1"], (before, after)
    assert report["train_pairs"] + report["val_pairs"] == 32


def test_model_folder_round_trip(trained: tuple[Path, dict], shapes_pairs: Path, tmp_path: Path) -> None:
    from mmsearch.encode import load_encoder
    from mmsearch.exemplars import EXEMPLAR_WEIGHTS, ExemplarMemory
    from mmsearch.rerank import RERANKER_WEIGHTS, Reranker

    out, report = trained
    assert (out / "open_clip_model.safetensors").is_file() and (out / "open_clip_config.json").is_file()
    assert not list(out.glob("*.pt")) and not list(out.glob("*.bin"))
    info = json.loads((out / "mmsearch_model.json").read_text())
    assert info["reranker_saved"] == report["reranker_saved"] == (out / RERANKER_WEIGHTS).is_file()
    remembered = any(w > 0 for w in report["exemplar_weights"].values())
    assert (out / EXEMPLAR_WEIGHTS).is_file() == remembered
    assert set(report["exemplar_weights"]) == {"text_to_image", "image_to_text"}
    if remembered:  # every caption of the pair file, validation ones included
        assert len(ExemplarMemory.load(out).captions) == 16 and report["reranker_saved"]
    if report["reranker_saved"]:
        encoder = load_encoder(str(out), "cpu")
        vectors, tokens = encoder.embed_images_with_tokens(_pixels(encoder, shapes_pairs))
        ranked = Reranker.load(encoder).rank("a red square", [
            {"id": 1, "score": 0.5, "tokens": tokens[0], "vector": vectors[0]},
        ], top_k=1)
        assert ranked[0]["id"] == 1 and isinstance(ranked[0]["score"], float)
    result = CliRunner().invoke(
        app, ["--home", str(tmp_path / "h"), "eval", str(shapes_pairs), "--model", str(out), "--json", "--quiet"]
        + (["--rerank"] if report["reranker_saved"] else []),
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(got) == {"text_to_image", "image_to_text", "rerank", "images", "texts"}
    assert all(0.0 <= v <= 1.0 for d in ("text_to_image", "image_to_text") for v in got[d].values())


def _pixels(encoder, pairs: Path):
    from PIL import Image as PILImage

    img = PILImage.open(pairs.parent / "img" / "red-square-0.png").convert("RGB")
    return encoder.preprocess(img).unsqueeze(0)


def test_training_resumes_from_its_checkpoint(trained: tuple[Path, dict], shapes_pairs: Path, tiny_model: Path) -> None:
    out, _ = trained
    opts = TrainOptions(
        pairs=shapes_pairs, out=out, base=str(tiny_model), epochs=40, batch_size=16, lr=2e-3,
        rerank_epochs=1, negatives=7, val_fraction=0.25,
    )
    messages: list[str] = []
    report = train(opts, progress=False, say=messages.append)
    assert report.resumed_from_epoch == 40
    assert any("resuming" in m for m in messages)


def test_reranker_kept_only_where_recall_at_1_does_not_drop() -> None:
    dual = {"text_to_image": {"R@1": 0.5}, "image_to_text": {"R@1": 0.4}}
    assert accept_reranker(dual, {"text_to_image": {"R@1": 0.6}, "image_to_text": {"R@1": 0.4}}) == [
        "text_to_image", "image_to_text"]
    assert accept_reranker(dual, {"text_to_image": {"R@1": 0.9}, "image_to_text": {"R@1": 0.39}}) == ["text_to_image"]
    assert accept_reranker(dual, {"text_to_image": {"R@1": 0.4}, "image_to_text": {"R@1": 0.3}}) == []


def test_train_rejects_bad_input(tmp_path: Path) -> None:
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"image": "missing.png", "text": "x"}\n')
    result = CliRunner().invoke(app, ["train", str(pairs), "--out", str(tmp_path / "m"), "--quiet"])
    assert result.exit_code != 0
    assert result.stderr.startswith("error: ") and "no such image" in result.stderr


def test_epoch_order_puts_two_drawings_of_a_caption_side_by_side() -> None:
    import numpy as np
    import torch

    from mmsearch.train import _epoch_order

    text_of = np.array([0, 1, 0, 2, 1, 0, 3, 2])  # text 0 has three drawings, text 3 one
    order = _epoch_order(text_of, torch.Generator().manual_seed(0)).tolist()
    assert sorted(order) == list(range(len(text_of)))
    runs, k = [], 0
    while k < len(order):  # split into runs: two of one text, else one
        n = 2 if k + 1 < len(order) and text_of[order[k]] == text_of[order[k + 1]] else 1
        runs.append([int(text_of[i]) for i in order[k:k + n]])
        k += n
    assert sorted(map(tuple, runs)) == [(0,), (0, 0), (1, 1), (2, 2), (3,)]


def test_image_image_term_pulls_two_drawings_of_one_caption_together(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    import torch.nn.functional as F

    from mmsearch import train as T

    txt = F.normalize(torch.rand(4, 8), dim=-1)
    apart = torch.eye(4, 8)  # no two images alike: picking the other drawing is a 1-in-3 guess, log 3
    together = apart.clone()
    together[1] = together[0]  # rows 0 and 1 draw the same caption
    images, scale = torch.tensor([0, 1, 2, 3]), torch.tensor(10.0)

    def term(img: torch.Tensor, texts: torch.Tensor) -> float:
        with_it = float(T._contrastive_loss(img, txt, scale, images, texts))
        monkeypatch.setattr(T, "IMAGE_LOSS_WEIGHT", 0.0)
        without = float(T._contrastive_loss(img, txt, scale, images, texts))
        monkeypatch.undo()
        return with_it - without

    shared = torch.tensor([0, 0, 1, 2])
    assert term(apart, shared) > 1.0 and term(together, shared) < 0.1  # the two drawings identical: nothing to learn
    assert term(apart, torch.tensor([0, 1, 2, 3])) == 0.0  # every caption different: no image-image term


def test_style_augmentation_redraws_but_keeps_hue_and_size() -> None:
    import torch

    from mmsearch.train import _restyle

    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    pic = torch.ones(64, 3, 32, 32)  # white pictures with a red square
    pic[:, 1:, 8:24, 8:24] = 0.1
    x = (pic - 0.5) / 0.25
    out = _restyle(x, torch.Generator().manual_seed(0), mean, std)
    again = _restyle(x, torch.Generator().manual_seed(0), mean, std)
    assert out.shape == x.shape and torch.equal(out, again)
    back = out * 0.25 + 0.5
    changed = (back - pic).abs().amax(dim=(1, 2, 3)) > 0.05
    assert 0.3 < changed.float().mean() < 1.0  # most pictures are redrawn, not all
    square = back[:, :, 12:20, 12:20]
    assert (square[:, 0] > square[:, 1] + 0.2).all()  # the square's centre stays red in every picture
    outlined = (back[:, :, 7, 8:24] < 0.2).all(dim=1).all(dim=1)  # a dark line just outside its top edge
    assert 0.05 < outlined.float().mean() < 0.6


def test_a_resnet_resumed_mid_run_ends_where_an_unbroken_run_does(
    shapes_pairs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The convolutional tower trains channels-last with fused AdamW; a resume must re-lay the saved state."""
    from conftest import save_tiny_model
    from safetensors.torch import load_file
    from test_rerank import TINY_RESNET_CFG

    import mmsearch.train as train_module

    base = save_tiny_model(tmp_path / "resnet", cfg=TINY_RESNET_CFG)

    def options(out: Path) -> TrainOptions:
        return TrainOptions(pairs=shapes_pairs, out=out, base=str(base), epochs=3, batch_size=8, lr=2e-3,
                            rerank_epochs=0, val_fraction=0.25)

    train(options(tmp_path / "unbroken"), progress=False, say=lambda _: None)

    save = train_module._save_checkpoint

    def save_then_stop(folder, model, opt, state):  # a kill just after the first epoch's checkpoint
        save(folder, model, opt, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(options(tmp_path / "broken"), progress=False, say=lambda _: None)
    monkeypatch.setattr(train_module, "_save_checkpoint", save)
    report = train(options(tmp_path / "broken"), progress=False, say=lambda _: None)
    assert report.resumed_from_epoch == 1

    unbroken = load_file(tmp_path / "unbroken" / "open_clip_model.safetensors")
    resumed = load_file(tmp_path / "broken" / "open_clip_model.safetensors")
    assert unbroken.keys() == resumed.keys()
    differ = [k for k in unbroken if not torch.allclose(unbroken[k], resumed[k], atol=1e-6)]
    assert not differ, differ


def test_default_batches_are_large_only_for_sets_that_fill_several_of_them() -> None:
    from mmsearch.train import BASE_BATCH, SMALL_BATCH, SMALL_BATCH_STEPS, default_batch, default_lr

    enough = SMALL_BATCH * SMALL_BATCH_STEPS
    assert default_batch(True, enough) == SMALL_BATCH
    assert default_batch(True, enough - 1) == BASE_BATCH  # a small set keeps several steps an epoch
    assert default_batch(False, 10 * enough) == BASE_BATCH  # fine-tuning a base
    assert default_lr(True, SMALL_BATCH) > default_lr(True, BASE_BATCH) > default_lr(False, SMALL_BATCH)


def test_each_text_encoded_once_gives_the_features_and_gradients_of_every_copy() -> None:
    import open_clip
    import torch

    from mmsearch.towers import encode_text_tokens
    from mmsearch.train import _text_features
    from conftest import TINY_CFG

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CFG)
    tokens = open_clip.get_tokenizer("ViT-B-32")(["red square", "blue circle", "a green bar", "cross"])
    ids = torch.tensor([0, 0, 2, 1, 2, 3, 1])
    weights = torch.randn(len(ids), TINY_CFG["embed_dim"])

    once = _text_features(model, tokens, ids, "cpu")
    (once * weights).sum().backward()
    grads_once = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    every = torch.nn.functional.normalize(encode_text_tokens(model, tokens[ids]), dim=-1)
    (every * weights).sum().backward()
    grads_every = [p.grad.clone() for p in model.parameters() if p.grad is not None]

    assert torch.allclose(once, every, atol=1e-6)
    assert len(grads_once) == len(grads_every) > 0
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads_once, grads_every))
