import numpy as np
import pytest
import torch

from mmsearch.encode import load_encoder
from mmsearch.towers import real_length
from mmsearch.errors import ModelSpecError, ModelUnavailableError


@pytest.fixture(scope="module")
def encoder(tiny_model):
    return load_encoder(str(tiny_model), "cpu", text_precision="float32")


def test_loads_local_dir_and_knows_its_shape(encoder, tiny_model):
    assert encoder.dim == 32
    assert encoder.image_size == 32
    assert encoder.spec.canonical == f"local-dir:{tiny_model.resolve()}"


def test_embeddings_are_normalised_float32(encoder):
    texts = encoder.embed_texts(["a red square", "a dog on a beach at sunset"])
    images = encoder.embed_images(torch.rand(3, 3, 32, 32))
    for arr, n in ((texts, 2), (images, 3)):
        assert arr.dtype == np.float32 and arr.shape == (n, 32)
        np.testing.assert_allclose(np.linalg.norm(arr, axis=1), 1.0, rtol=1e-5)


def test_truncated_text_equals_77_token_padded(encoder):
    texts = ["cat", "a photograph of a dog running on a sandy beach", "sunset over the sea"]
    tokens = encoder.tokenize(texts)
    assert tokens.shape[1] == 77 and real_length(tokens) < 20  # the batch really is cut
    truncated = encoder.embed_texts(texts, truncate=True)
    padded = encoder.embed_texts(texts, truncate=False)
    np.testing.assert_allclose(truncated, padded, atol=1e-5)


def test_bfloat16_text_side_agrees_with_float32_and_leaves_the_model_alone(encoder, tiny_model):
    texts = ["cat", "a photograph of a dog running on a sandy beach", "sunset over the sea"]
    half = load_encoder(str(tiny_model), "cpu", text_precision="bfloat16")
    assert half.text_side is not None and encoder.text_side is None
    assert next(half.text_side.parameters()).dtype == torch.bfloat16
    assert next(half.model.parameters()).dtype == torch.float32  # the model itself is left as it is
    low, full = half.embed_texts(texts), encoder.embed_texts(texts)
    assert low.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(low, axis=1), 1.0, rtol=1e-5)
    assert not np.array_equal(low, full)  # it really ran in bfloat16
    assert (low * full).sum(axis=1).min() > 0.999
    # the padded pass (truncate=False) runs the float32 model
    np.testing.assert_allclose(half.embed_texts(texts, truncate=False), full, atol=1e-5)


def test_checkpoint_spec_loads_the_same_weights(tiny_model, encoder, tmp_path):
    import json

    import open_clip

    # NAME:/path/to/checkpoint needs an architecture open_clip knows by name
    config = tmp_path / "mmsearch-test-tiny.json"
    config.write_text(json.dumps(json.loads((tiny_model / "open_clip_config.json").read_text())["model_cfg"]))
    open_clip.add_model_config(config)
    other = load_encoder(f"mmsearch-test-tiny:{tiny_model / 'open_clip_model.safetensors'}", "cpu", text_precision="float32")
    np.testing.assert_allclose(other.embed_texts(["hello"]), encoder.embed_texts(["hello"]), atol=1e-6)


def test_unknown_architecture_and_tag():
    with pytest.raises(ModelSpecError, match="unknown model architecture"):
        load_encoder("NoSuchNet:openai", "cpu")
    with pytest.raises(ModelSpecError, match="unknown pretrained tag"):
        load_encoder("ViT-B-32:no_such_tag", "cpu")


def test_offline_without_cache_says_what_to_do():
    # HF_HUB_OFFLINE=1 and an empty HF_HOME come from conftest
    with pytest.raises(ModelUnavailableError) as info:
        load_encoder("ViT-B-32:laion2b_s34b_b79k", "cpu")
    message = str(info.value)
    assert "no network" in message and "--model" in message and "\n" not in message


def test_model_dir_without_weights(tmp_path, tiny_model):
    folder = tmp_path / "noweights"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text((tiny_model / "open_clip_config.json").read_text())
    with pytest.raises(ModelUnavailableError, match="holds no weights"):
        load_encoder(str(folder), "cpu")


@pytest.mark.parametrize("listening", [True, False])
def test_an_unreachable_hub_is_put_offline_at_once(monkeypatch, listening):
    """With no route to the hub, huggingface_hub goes cache-only instead of retrying for a minute."""
    import socket

    from huggingface_hub import constants

    from mmsearch.runtime import hub_offline_unless_reachable

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if listening:
        server.listen(1)
    else:
        server.close()  # nothing listens on the port: connection refused
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    try:
        assert hub_offline_unless_reachable(timeout=2.0) is (not listening)
        assert constants.HF_HUB_OFFLINE is (not listening)
    finally:
        server.close()


def test_every_weight_comes_from_the_file_and_random_init_is_restored(encoder, tiny_model):
    """The model is built without random fills; every parameter must then be the file's."""
    from safetensors.torch import load_file

    saved = load_file(tiny_model / "open_clip_model.safetensors")
    loaded = encoder.model.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(loaded[name], value) for name, value in saved.items())
    uniform = torch.nn.init.uniform_
    filled = uniform(torch.zeros(1000), 0.5, 1.0)  # the real fill again, after loading
    assert uniform.__module__ == "torch.nn.init" and float(filled.min()) >= 0.5


def test_a_checkpoint_missing_a_weight_is_refused(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text((tiny_model / "open_clip_config.json").read_text())
    weights = load_file(tiny_model / "open_clip_model.safetensors")
    weights.pop("visual.conv1.weight")
    save_file(weights, folder / "open_clip_model.safetensors")
    expected = r"could not load model .*do not fit the architecture: Missing key\(s\) in state_dict: \"visual\.conv1\.weight\""
    with pytest.raises(ModelUnavailableError, match=expected):
        load_encoder(str(folder), "cpu")
