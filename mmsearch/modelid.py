"""Model identity: what a local model is (a hash of its config and weights), not where it lies.

A home records the hash of the local model that made its vectors, so a model
folder or weights file that was moved or copied elsewhere is recognised as
the same model, and a different one is refused wherever it lies. Pretrained
tags and hub models are known by their spec string and need no hash. No
torch here: hashing is plain file reading.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from mmsearch.modelspec import ModelSpec

#: Bytes read at a time while hashing.
CHUNK = 1 << 20

#: Where open_clip's local-dir layout may keep the weights, in the order they are looked for.
LOCAL_DIR_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
    "model.pth",
)


def local_dir_weights(path: Path) -> Path | None:
    """The weights file a local-dir model folder is loaded from, or None when it holds none."""
    for name in LOCAL_DIR_WEIGHTS:
        if (path / name).is_file():
            return path / name
    found = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")) + sorted(path.glob("*.pth"))
    return found[0] if found else None


def is_local(spec: ModelSpec) -> bool:
    """Whether the spec names files on this machine (so its identity is their content)."""
    return spec.kind in ("local-dir", "checkpoint")


def model_files(spec: ModelSpec) -> list[Path] | None:
    """The files whose bytes decide what a local model computes; None when they are not all there."""
    if spec.path is None or not is_local(spec):
        return None
    if spec.kind == "checkpoint":
        return [spec.path] if spec.path.is_file() else None
    config = spec.path / "open_clip_config.json"
    if not config.is_file():
        return None
    weights = local_dir_weights(spec.path)
    return [config, weights] if weights is not None else None


def stamp(files: list[Path]) -> str:
    """Path, size and mtime of each file: while it is unchanged, a recorded hash still holds."""
    rows = []
    for path in files:
        st = os.stat(path)
        rows.append([str(path), st.st_size, st.st_mtime_ns])
    return json.dumps(rows, ensure_ascii=True)


def fingerprint(spec: ModelSpec, files: list[Path]) -> str:
    """SHA-256 of what makes the model: its kind, the architecture a checkpoint names, the files' bytes.

    File names are left out (a renamed weights file is the same model); each
    file's length goes in first, so the bytes of two files cannot run together.
    SHA-256 rather than BLAKE2b: CPUs with SHA extensions hash it about twice
    as fast (docs/reliability-disk.md).
    """
    digest = hashlib.sha256()
    digest.update(f"{spec.kind}\0{spec.name if spec.kind == 'checkpoint' else ''}\0".encode())
    for path in files:
        with open(path, "rb") as fh:
            digest.update(os.fstat(fh.fileno()).st_size.to_bytes(8, "little"))
            while block := fh.read(CHUNK):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"
