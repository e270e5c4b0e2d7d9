"""Encode stage: load an open_clip dual encoder from a spec and embed images and texts.

Every embedding leaves this module as an L2-normalised float32 numpy array.
torch and open_clip are imported here and nowhere on the CLI's start-up path.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from mmsearch.errors import (
    ModelSpecError,
    ModelUnavailableError,
    UnsafeCheckpointError,
)
from mmsearch.modelid import local_dir_weights
from mmsearch.modelspec import ModelSpec, parse

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
_configs_registered = False


def register_model_configs() -> None:
    """Make the architectures that ship with mmsearch known to open_clip."""
    global _configs_registered
    if not _configs_registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _configs_registered = True


def share_cores_with_decoding() -> bool:
    """Make torch's OpenMP threads sleep, not spin, between ops; call before torch is imported.

    Indexing decodes images in threads while the model runs on all cores. By
    default an idle OpenMP thread spins for a while, holding a core the
    decoders need, and each op then waits for its slowest thread. On 2 cores
    (bench/index_throughput.py, share of the model-only rate) sleeping gave
    0.62 → 0.80 and 0.74 → 0.82 under load from other jobs, 0.61 → 0.64 on a
    quiet machine. The policy is read when the OpenMP runtime
    loads, so this does nothing once torch is imported, or when the user set
    ``OMP_WAIT_POLICY`` already. Returns whether the policy is now passive.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_weights_file(path: Path) -> None:
    """Refuse a weights file that cannot be read without running pickled code.

    safetensors files hold no code; anything else must load with
    ``torch.load(weights_only=True)``, which refuses arbitrary objects.
    """
    if not path.is_file():
        raise ModelUnavailableError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return
    if path.suffix == ".npz":
        raise UnsafeCheckpointError(f"{path}: numpy checkpoints are not supported; convert to .safetensors")
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # torch's first line is advice about its defaults; the reason is further down
        code = re.search(r"unsupported (?:global: )?GLOBAL ([\w.]+)", str(exc), re.IGNORECASE)
        if code:
            reason = f"its pickle would call {code.group(1)}"
        elif first.startswith("Weights only load failed"):
            reason = "it holds pickled objects, not only tensors"
        else:
            reason = first[:160]
        raise UnsafeCheckpointError(
            f"{path}: refused to load: not a plain weights file ({reason}); "
            "use a .safetensors file or a torch state dict"
        ) from None


def _offline_hint(spec: ModelSpec) -> str:
    return (
        f"could not get the weights for {spec} (no network and not in the cache?). "
        "Run once with network access to cache them, or pass local weights: "
        "--model NAME:/path/to/weights.safetensors or --model /path/to/model-dir"
    )


def hub_offline_unless_reachable(timeout: float = 3.0) -> bool:
    """Put huggingface_hub in offline mode (cache only) when its endpoint cannot be reached.

    With no network, a download of pretrained weights retried for ~55 s before
    failing (measured here); probing the endpoint first fails in ``timeout``
    seconds, and cached weights still load. Not probed when ``HF_HUB_OFFLINE``
    is set or a proxy is configured (a direct connection proves nothing then).
    Returns whether the hub is now offline.
    """
    import socket
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
    if constants.HF_HUB_OFFLINE or any(os.environ.get(name) for name in proxies):
        return bool(constants.HF_HUB_OFFLINE)
    url = urlsplit(constants.ENDPOINT)
    address = (url.hostname or "", url.port or (80 if url.scheme == "http" else 443))
    reached: list[bool] = []

    def probe() -> None:  # in a thread: name resolution itself can hang past any socket timeout
        try:
            socket.create_connection(address, timeout=timeout).close()
            reached.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=probe, daemon=True, name="mmsearch-hub-probe")
    worker.start()
    worker.join(timeout)
    if not reached:
        log.info("%s:%s unreachable; using cached weights only", *address)
        constants.HF_HUB_OFFLINE = True
    return not reached


def _create(spec: ModelSpec, device: str) -> tuple[Any, Callable, Any]:
    import open_clip

    register_model_configs()
    kwargs: dict[str, Any] = {"device": device, "weights_only": True}
    if spec.kind == "pretrained":
        if spec.name not in open_clip.list_models():
            raise ModelSpecError(
                f"unknown model architecture {spec.name!r}; see open_clip.list_models() "
                "or use the default ViT-B-32:laion2b_s34b_b79k"
            )
        tags = open_clip.list_pretrained_tags_by_model(spec.name)
        if spec.tag not in tags:
            known = ", ".join(tags) if tags else "none"
            raise ModelSpecError(f"unknown pretrained tag {spec.tag!r} for {spec.name} (known: {known})")
        args: tuple[str, ...] = (spec.name,)
        kwargs["pretrained"] = spec.tag
    elif spec.kind == "hf-hub":
        args = (f"hf-hub:{spec.name}",)
    elif spec.kind == "local-dir":
        assert spec.path is not None
        config = spec.path / "open_clip_config.json"
        if not config.is_file():
            raise ModelSpecError(f"{spec.path} is not a model directory: no open_clip_config.json in it")
        weights = local_dir_weights(spec.path)
        if weights is None:
            raise ModelUnavailableError(f"{spec.path} holds no weights (open_clip_model.safetensors)")
        check_weights_file(weights)
        args = (f"local-dir:{spec.path}",)
    else:
        assert spec.path is not None
        if spec.name not in open_clip.list_models():
            raise ModelSpecError(f"unknown model architecture {spec.name!r} in {spec}")
        check_weights_file(spec.path)
        args = (spec.name,)
        kwargs["pretrained"] = str(spec.path)

    if spec.kind in ("pretrained", "hf-hub"):
        hub_offline_unless_reachable()
    # Every spec names weights for the whole model: refuse to return it half-loaded
    # (open_clip then loads strictly), which also makes random initialisation wasted work.
    kwargs["require_pretrained"] = True
    # open_clip logs a failed download itself; we say it once, as our error line
    logging.disable(logging.ERROR)
    try:
        with _no_random_init():
            model, _, preprocess = open_clip.create_model_and_transforms(*args, **kwargs)
    except (ModelSpecError, ModelUnavailableError):
        raise
    except Exception as exc:  # open_clip and the hub raise many kinds
        if spec.kind in ("pretrained", "hf-hub") and _is_fetch_failure(exc):
            raise ModelUnavailableError(_offline_hint(spec)) from None
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        if lines and lines[0].startswith("Error(s) in loading state_dict"):
            reason = "the weights do not fit the architecture: " + " ".join(lines[1:])  # which keys, on one line
        else:
            reason = lines[0] if lines else type(exc).__name__
        raise ModelUnavailableError(f"could not load model {spec}: {reason[:300]}") from None
    finally:
        logging.disable(logging.NOTSET)
    tokenizer = open_clip.get_tokenizer(*args[:1])
    return model, preprocess, tokenizer


#: torch.nn.init's random fills: what building a model spends its time on.
_RANDOM_INITS = (
    "uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
    "xavier_uniform_", "xavier_normal_", "orthogonal_",
)


@contextmanager
def _no_random_init() -> Iterator[None]:
    """Leave new parameters unfilled while building a model whose weights are all loaded next.

    Building ViT-B-32 spent 1.2 of its 1.5 s filling ~150M parameters with
    random numbers that the checkpoint then overwrote. Only for a model loaded
    with ``require_pretrained`` (a strict, complete load); a model trained from
    scratch (mmsearch.train) is built without this.
    """
    import torch.nn.init as init

    saved = {name: getattr(init, name) for name in _RANDOM_INITS}

    def unfilled(tensor: Any, *_args: Any, **_kwargs: Any) -> Any:
        return tensor

    try:
        for name in saved:
            setattr(init, name, unfilled)
        yield
    finally:
        for name, fill in saved.items():
            setattr(init, name, fill)


def _is_fetch_failure(exc: BaseException) -> bool:
    text = f"{type(exc).__name__} {exc}".lower()
    markers = (
        "offline", "connection", "resolve", "network", "timed out", "timeout",
        "localentrynotfound", "cannot find the requested files", "failed to download",
        "max retries", "name or service", "hub",
    )
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text += f" {type(cur).__name__} {cur}".lower()
        cur = cur.__cause__ or cur.__context__
    return any(m in text for m in markers)


@dataclass
class Encoder:
    """A loaded dual encoder: images and texts in, normalised vectors out."""

    spec: ModelSpec
    model: Any
    preprocess: Callable[["Image.Image"], "torch.Tensor"]
    tokenizer: Any
    device: str
    dim: int = 0

    def __post_init__(self) -> None:
        if not self.dim:
            self.dim = int(self.embed_texts(["a"]).shape[1])

    @property
    def image_size(self) -> int:
        size = getattr(self.model.visual, "image_size", 224)
        return int(max(size) if isinstance(size, (tuple, list)) else size)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    def embed_images(self, pixels: "torch.Tensor") -> np.ndarray:
        """Embed a batch of preprocessed images, shape (N, 3, H, W)."""
        import torch

        with torch.inference_mode():
            features = self.model.encode_image(pixels.to(self.device), normalize=True)
        return features.float().cpu().numpy().astype(np.float32, copy=False)

    def embed_images_with_tokens(self, pixels: "torch.Tensor") -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`embed_images`, plus each image's patch tokens for the re-ranker.

        Tokens are the vision tower's final states after ``ln_post``, projected
        into the shared embedding space: float16, shape (N, patches, dim).
        """
        import torch

        from mmsearch.rerank import image_token_states

        with torch.inference_mode():
            pooled, tokens = image_token_states(self.model, pixels.to(self.device))
            pooled = torch.nn.functional.normalize(pooled.float(), dim=-1)
        return (
            pooled.cpu().numpy().astype(np.float32, copy=False),
            tokens.to(torch.float16).cpu().numpy(),
        )

    def tokenize(self, texts: Sequence[str]) -> "torch.Tensor":
        return self.tokenizer(list(texts))

    def embed_texts(self, texts: Sequence[str], *, truncate: bool = True) -> np.ndarray:
        """Embed texts; with ``truncate`` the batch runs at its real token length.

        A causal text tower pooled at the end-of-text token gives the same
        vector for any length that holds every real token, so cutting the
        77-token padding only saves work.
        """
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tokens = self.tokenize(texts).to(self.device)
        with torch.inference_mode(), _single_thread_if(self.device == "cpu" and len(texts) <= SMALL_TEXT_BATCH):
            features = encode_text_tokens(self.model, tokens, truncate=truncate)
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)


#: Text batches up to this size run on one CPU thread (a search query is one text).
SMALL_TEXT_BATCH = 8


@contextmanager
def _single_thread_if(condition: bool) -> Iterator[None]:
    """Run torch on one thread inside the block, when ``condition``.

    A short query is ~150 tiny ops; each one run on two OpenMP threads waits
    for both to be scheduled, and on a busy 2-core machine that took 250-760 ms
    against a steady ~47 ms on one thread (bench/text_encode.py).
    """
    if not condition:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def threads_per_lane(lanes: int) -> Iterator[int]:
    """Split torch's CPU threads between ``lanes`` threads that each run the model; yields the lane count.

    Inside the block each thread that starts using torch runs its ops on
    ``threads // lanes`` threads of its own (torch hands its thread count to a
    new thread on first use), so lanes started here never share an OpenMP team
    with each other. The count is restored on the way out. On 2 cores, two
    lanes of one thread encoded faster than one model on two threads in each
    of five runs (bench/index_throughput.py, model-only rows: 15.0-17.1 vs
    13.3-15.3 img/s), and each lane decodes between its batches instead of
    pre-empting the model.
    """
    import torch

    before = torch.get_num_threads()
    lanes = max(1, min(lanes, before))
    torch.set_num_threads(max(1, before // lanes))
    try:
        yield lanes
    finally:
        torch.set_num_threads(before)


def _text_tower(model: Any) -> Any:
    """The module holding token_embedding/positional_embedding/transformer."""
    return model if hasattr(model, "token_embedding") else getattr(model, "text", None)


def encode_text_tokens(model: Any, tokens: "torch.Tensor", *, truncate: bool = True) -> "torch.Tensor":
    """Unnormalised text features of a token batch; at its real length when the tower allows.

    The one place that decides between the truncated and the padded pass, for
    search (:meth:`Encoder.embed_texts`) and for training alike.
    """
    if truncate and _supports_truncation(model):
        return _encode_text_truncated(model, tokens)
    return model.encode_text(tokens)


def _supports_truncation(model: Any) -> bool:
    tower = _text_tower(model)
    if tower is None or not hasattr(tower, "token_embedding"):
        return False
    pool = getattr(tower, "text_pool_type", getattr(tower, "pool_type", None))
    return (
        pool == "argmax"
        and getattr(tower, "attn_mask", None) is not None
        and getattr(tower, "cls_emb", None) is None
    )


def real_length(tokens: "torch.Tensor") -> int:
    """Token count up to and including the last end-of-text token in the batch."""
    return int(tokens.argmax(dim=-1).max().item()) + 1


def text_states_after_ln(model: Any, tokens: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
    """Per-token states after ``ln_final`` of a batch cut at its real length, and the cut tokens."""
    tower = _text_tower(model)
    length = real_length(tokens)
    tokens = tokens[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    return tower.ln_final(x), tokens


def _encode_text_truncated(model: Any, tokens: "torch.Tensor") -> "torch.Tensor":
    import torch
    from open_clip.transformer import text_global_pool

    tower = _text_tower(model)
    x, tokens = text_states_after_ln(model, tokens)
    x = text_global_pool(x, tokens, "argmax")
    projection = tower.text_projection
    if projection is not None:
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
    return x


def load_encoder(spec: ModelSpec | str, device: str = "auto", *, int8: bool = False) -> Encoder:
    """Build the encoder a spec names; every failure is a one-line MmsearchError.

    ``int8`` quantises the image tower (CPU only, see :mod:`mmsearch.quantize`).
    """
    if isinstance(spec, str):
        spec = parse(spec)
    device = resolve_device(device)
    model, preprocess, tokenizer = _create(spec, device)
    model.eval()
    if int8:
        from mmsearch.quantize import quantize_image_tower

        quantize_image_tower(model, device)
    return Encoder(spec=spec, model=model, preprocess=preprocess, tokenizer=tokenizer, device=device)
