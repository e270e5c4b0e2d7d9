from pathlib import Path

import pytest

from mmsearch.errors import ModelSpecError
from mmsearch.modelspec import parse


def test_name_and_tag():
    spec = parse("ViT-B-32:laion2b_s34b_b79k")
    assert (spec.kind, spec.name, spec.tag) == ("pretrained", "ViT-B-32", "laion2b_s34b_b79k")
    assert spec.canonical == "ViT-B-32:laion2b_s34b_b79k"


def test_hf_hub():
    spec = parse("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert spec.kind == "hf-hub" and spec.name == "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    with pytest.raises(ModelSpecError):
        parse("hf-hub:no-slash")


def test_local_dir_with_and_without_prefix(tmp_path: Path):
    folder = tmp_path / "m"
    folder.mkdir()
    assert parse(str(folder)).canonical == parse(f"local-dir:{folder}").canonical == f"local-dir:{folder.resolve()}"


def test_checkpoint_path_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    spec = parse("ViT-B-32:./weights.safetensors")
    assert spec.kind == "checkpoint" and spec.path == tmp_path / "weights.safetensors"


@pytest.mark.parametrize("bad", ["", "ViT-B-32", ":tag", "name:", "./missing-dir"])
def test_bad_specs_say_what_to_do(bad: str):
    with pytest.raises(ModelSpecError) as info:
        parse(bad)
    assert "\n" not in str(info.value)
