"""Training: a short run on a generated set raises Recall; the model folder round-trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from mmsearch.cli import app
from mmsearch.evaluate import evaluate
from mmsearch.settings import resolve
from mmsearch.train import CHECKPOINT, TrainOptions, _augment, accept_reranker, train

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
    from mmsearch.rerank import RERANKER_WEIGHTS, Reranker

    out, report = trained
    assert (out / "open_clip_model.safetensors").is_file() and (out / "open_clip_config.json").is_file()
    assert not list(out.glob("*.pt")) and not list(out.glob("*.bin"))
    info = json.loads((out / "mmsearch_model.json").read_text())
    assert info["reranker_saved"] == report["reranker_saved"] == (out / RERANKER_WEIGHTS).is_file()
    if report["reranker_saved"]:
        encoder = load_encoder(str(out), "cpu")
        ranked = Reranker.load(encoder).rank("a red square", [
            {"id": 1, "score": 0.5, "tokens": encoder.embed_images_with_tokens(_pixels(encoder, shapes_pairs))[1][0]},
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


def test_checkpoint_of_another_augmentation_is_not_resumed(
    trained: tuple[Path, dict], shapes_pairs: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """A checkpoint written before the augmentation was recorded is trained anew, not resumed."""
    import shutil

    out = tmp_path / "model"
    shutil.copytree(trained[0], out)
    state_file = out / CHECKPOINT / "state.json"
    state = json.loads(state_file.read_text())
    del state["augmentation"]
    state_file.write_text(json.dumps(state))
    opts = TrainOptions(
        pairs=shapes_pairs, out=out, base=str(tiny_model), epochs=40, batch_size=16, lr=2e-3,
        rerank_epochs=1, negatives=7, val_fraction=0.25,
    )
    assert train(opts, progress=False, say=lambda _: None).resumed_from_epoch == 0


def test_augmentation_keeps_colours() -> None:
    """Crops, tone, blur and erasing change a picture but never its hues (skin tones, flags)."""
    import torch

    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (255, 220, 177), (141, 85, 36), (240, 230, 20)]
    plain = torch.tensor(colours).float().div(255).view(-1, 3, 1, 1).expand(-1, 3, 32, 32).repeat(20, 1, 1, 1)
    out = _augment((plain - m) / s, torch.Generator().manual_seed(0), mean, std) * s + m
    assert out.shape == plain.shape
    assert (out - plain).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image was changed

    def chroma(x: torch.Tensor) -> torch.Tensor:  # (r - g, g - b) per pixel: its direction is the hue
        return torch.stack([x[:, 0] - x[:, 1], x[:, 1] - x[:, 2]], dim=-1)

    before, after = chroma(plain), chroma(out)
    size = after.norm(dim=-1)
    coloured = size > 1e-3  # erased pixels are white: no hue at all
    assert coloured.float().mean() > 0.9
    cosine = (before * after).sum(-1) / (before.norm(dim=-1) * size).clamp(min=1e-9)
    assert cosine[coloured].min() > 0.999  # the same hue wherever there is colour
    saturation = size[coloured] / before.norm(dim=-1)[coloured]
    assert saturation.min() > 0.5  # and no drift toward grey


def test_augmentation_is_seeded() -> None:
    import torch

    x = torch.randn(4, 3, 32, 32)
    a = _augment(x, torch.Generator().manual_seed(3), [0.5] * 3, [0.25] * 3)
    b = _augment(x, torch.Generator().manual_seed(3), [0.5] * 3, [0.25] * 3)
    assert torch.equal(a, b)


def test_reranker_kept_only_if_recall_at_1_does_not_drop() -> None:
    dual = {"text_to_image": {"R@1": 0.5}, "image_to_text": {"R@1": 0.4}}
    assert accept_reranker(dual, {"text_to_image": {"R@1": 0.6}, "image_to_text": {"R@1": 0.4}})
    assert not accept_reranker(dual, {"text_to_image": {"R@1": 0.9}, "image_to_text": {"R@1": 0.39}})


def test_train_rejects_bad_input(tmp_path: Path) -> None:
    pairs = tmp_path / "p.jsonl"
    pairs.write_text('{"image": "missing.png", "text": "x"}\n')
    result = CliRunner().invoke(app, ["train", str(pairs), "--out", str(tmp_path / "m"), "--quiet"])
    assert result.exit_code != 0
    assert result.stderr.startswith("error: ") and "no such image" in result.stderr
