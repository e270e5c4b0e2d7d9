"""Model specs: the strings that name a model (no torch here, so parsing is instant).

Accepted forms::

    NAME:TAG                  open_clip architecture + pretrained tag (downloaded, cached)
    hf-hub:ORG/REPO           an open_clip model on the Hugging Face Hub
    local-dir:/path/to/dir    open_clip's local-dir layout (open_clip_config.json + weights)
    /path/to/dir              the same, without the prefix
    NAME:/path/to/checkpoint  an open_clip architecture + a local weights file
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mmsearch.errors import ModelSpecError

SpecKind = Literal["pretrained", "hf-hub", "local-dir", "checkpoint"]

HF_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".npz")


@dataclass(frozen=True)
class ModelSpec:
    kind: SpecKind
    #: open_clip architecture name (pretrained, checkpoint) or hub repo id (hf-hub).
    name: str | None = None
    #: pretrained tag, for ``kind == "pretrained"``.
    tag: str | None = None
    #: directory (local-dir) or weights file (checkpoint), absolute.
    path: Path | None = None

    @property
    def canonical(self) -> str:
        """The one string recorded in a home for this model."""
        if self.kind == "pretrained":
            return f"{self.name}:{self.tag}"
        if self.kind == "hf-hub":
            return f"{HF_PREFIX}{self.name}"
        if self.kind == "local-dir":
            return f"{LOCAL_DIR_PREFIX}{self.path}"
        return f"{self.name}:{self.path}"

    def __str__(self) -> str:
        return self.canonical


def _looks_like_path(text: str) -> bool:
    return (
        os.sep in text
        or "/" in text
        or text.startswith((".", "~"))
        or text.lower().endswith(CHECKPOINT_SUFFIXES)
    )


def parse(spec: str) -> ModelSpec:
    """Parse a model spec string; raises :class:`ModelSpecError` with a hint."""
    spec = spec.strip()
    if not spec:
        raise ModelSpecError("empty model spec; use NAME:TAG, hf-hub:ORG/REPO or a model directory")
    if spec.startswith(HF_PREFIX):
        repo = spec[len(HF_PREFIX):].strip()
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ModelSpecError(f"model spec {spec!r}: expected hf-hub:ORG/REPO")
        return ModelSpec("hf-hub", name=repo)
    if spec.startswith(LOCAL_DIR_PREFIX):
        return ModelSpec("local-dir", path=_absolute(spec[len(LOCAL_DIR_PREFIX):], spec))
    candidate = Path(spec).expanduser()
    if candidate.is_dir():
        return ModelSpec("local-dir", path=candidate.resolve())
    if ":" not in spec:
        if _looks_like_path(spec):
            raise ModelSpecError(f"model directory not found: {spec}")
        raise ModelSpecError(
            f"model spec {spec!r} has no pretrained tag; use NAME:TAG "
            f"(for example ViT-B-32:laion2b_s34b_b79k), hf-hub:ORG/REPO, or a model directory"
        )
    name, rest = spec.split(":", 1)
    name, rest = name.strip(), rest.strip()
    if not name or not rest:
        raise ModelSpecError(f"model spec {spec!r}: expected NAME:TAG or NAME:/path/to/checkpoint")
    if _looks_like_path(rest):
        return ModelSpec("checkpoint", name=name, path=_absolute(rest, spec))
    return ModelSpec("pretrained", name=name, tag=rest)


def _absolute(raw: str, spec: str) -> Path:
    raw = raw.strip()
    if not raw:
        raise ModelSpecError(f"model spec {spec!r} names no path")
    return Path(raw).expanduser().resolve()
