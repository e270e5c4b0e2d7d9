"""Encode stage: load an open_clip dual encoder from a spec and embed images and texts.

Every embedding leaves this module as an L2-normalised float32 numpy array.
torch and open_clip are imported here and nowhere on the CLI's start-up path.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

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

CONFIG_DIR = Path(__file__).parent / "model_configs"
_configs_registered = False


def register_model_configs() -> None:
    """Make the architectures that ship with mmsearch known to open_clip."""
    global _configs_registered
    if not _configs_registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _configs_registered = True


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

    # Every spec names weights for the whole model: refuse to return it half-loaded
    # (open_clip then loads strictly), which also makes random initialisation wasted work.
    kwargs["require_pretrained"] = True
    from mmsearch.towers import unfilled_parameters

    try:
        with unfilled_parameters():
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
    tokenizer = open_clip.get_tokenizer(*args[:1])
    return model, preprocess, tokenizer




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
    #: A bfloat16 copy of the text tower that text passes run on, or ``None``
    #: for float32 (see :func:`load_encoder`'s ``text_precision``).
    text_side: Any = None

    def __post_init__(self) -> None:
        if not self.dim:
            self.dim = int(self.embed_texts(["a"]).shape[1])

    @property
    def image_size(self) -> int:
        size = getattr(self.model.visual, "image_size", 224)
        return int(max(size) if isinstance(size, (tuple, list)) else size)

    @property
    def text_model(self) -> Any:
        """What text passes run on: the bfloat16 text side when there is one, else the model.

        The re-ranker's text states come from it too, so that an untrained
        re-ranker's score is exactly the dual encoder's.
        """
        return self.text_side if self.text_side is not None else self.model

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

        from mmsearch.towers import image_token_states

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
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self.embed_text_tokens(self.tokenize(texts), truncate=truncate)

    def embed_text_tokens(self, tokens: "torch.Tensor", *, truncate: bool = True) -> np.ndarray:
        """Embed an already tokenised batch (a caller that also counts truncated texts tokenises once)."""
        import torch

        from mmsearch.towers import encode_text_tokens

        with torch.inference_mode():
            model = self.text_model if truncate else self.model
            features = encode_text_tokens(model, tokens.to(self.device), truncate=truncate)
            features = torch.nn.functional.normalize(features.float(), dim=-1)
        return features.cpu().numpy().astype(np.float32, copy=False)


def load_encoder(
    spec: ModelSpec | str, device: str = "auto", *, int8: bool = False, text_precision: str = "auto"
) -> Encoder:
    """Build the encoder a spec names; every failure is a one-line MmsearchError.

    ``int8`` quantises the image tower (CPU only, see :mod:`mmsearch.quantize`).
    ``text_precision`` is how texts are encoded: ``float32``; ``bfloat16``
    (a bfloat16 copy of a CLIP-style text tower: half the bytes to read per
    query, on the CPU's bfloat16 units where it has them); ``auto``, bfloat16
    on a CPU with native bfloat16 and float32 elsewhere.
    """
    if isinstance(spec, str):
        spec = parse(spec)
    device = resolve_device(device)
    model, preprocess, tokenizer = _create(spec, device)
    model.eval()
    if int8:
        from mmsearch.quantize import quantize_image_tower

        quantize_image_tower(model, device)
    from mmsearch.towers import bfloat16_text_side, native_bfloat16

    text_side = None
    if text_precision == "bfloat16" or (text_precision == "auto" and native_bfloat16(device)):
        text_side = bfloat16_text_side(model)
    return Encoder(
        spec=spec, model=model, preprocess=preprocess, tokenizer=tokenizer, device=device, text_side=text_side
    )
