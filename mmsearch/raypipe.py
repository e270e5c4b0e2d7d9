"""Decode and encode on a Ray cluster: the middle stages of :mod:`mmsearch.indexer` run by Ray Data.

The driver discovers, plans and writes exactly as in a plain run; only the
files to encode go through Ray: their paths become a dataset, decoding runs
in CPU tasks, encoding in a pool of actors that each load the model once (a
GPU each where the cluster has GPUs), and the vectors stream back to the
driver's one catalog writer. Workers read files by path, so the folders must
be mounted at the same path on every node; a file the driver can read and a
worker cannot is a :class:`~mmsearch.errors.SharedMountError`.

A worker killed mid-run is restarted and its batch retried by Ray; nothing
is written twice, because only the driver writes, once per file.

Tested with Ray 2.52 (``map_batches`` takes ``concurrency`` for the actor
pool; older releases spelled it ``compute=ActorPoolStrategy``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from mmsearch.decode import Decoded, Skipped, decode_file
from mmsearch.discover import FileEntry
from mmsearch.errors import SharedMountError, UsageError

#: Ray releases this module was tested with (``pip install 'mmsearch[ray]'``).
RAY_VERSIONS = ">=2.40,<2.53"

#: How often Ray restarts a killed encoding actor and retries its batch.
RETRIES = 3


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'mmsearch[ray]'") from None
    return ray


@contextmanager
def connected(address: str | None = None, **init_args: Any) -> Iterator[Any]:
    """Ray for the length of a run, for front ends: the cluster at ``address``.

    With no address Ray connects to ``RAY_ADDRESS`` if it is set, else starts a
    local cluster, stopped again at the end. A process that is already
    connected (a test's cluster, a notebook) keeps its connection. Ray Data's
    own progress bars and info lines are turned off for the process: the
    indexer's bar and skipped-file lines are the run's output.
    """
    import logging

    ray = _ray()
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    if ray.is_initialized():
        yield ray
        return
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **init_args)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"cannot reach the Ray cluster {address or os.environ.get('RAY_ADDRESS') or '(local)'}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


_NO_PIXELS = np.zeros((0, 0, 3), dtype=np.uint8)  # a file not to encode (skipped, or its vector reused)


class Decoder:
    """A Ray Data batch function: read, hash and decode files to uint8 pixels (runs in CPU tasks)."""

    def __init__(self, per_image: Callable[[Any], Any], min_side: int, known: frozenset[str], max_bytes: int):
        self.per_image, self.min_side, self.known, self.max_bytes = per_image, min_side, known, max_bytes

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        from mmsearch.decode import enable_heif

        enable_heif()
        out: dict[str, list[Any]] = {k: [] for k in ("path", "size", "mtime_ns", "hash", "width", "height",
                                                     "pixels", "reason", "transient", "readable")}
        for path, size, mtime in zip(batch["path"], batch["size"], batch["mtime_ns"]):
            result = decode_file(FileEntry(str(path), int(size), int(mtime)), self.per_image, self.min_side,
                                 self.known.__contains__, self.max_bytes)
            if isinstance(result, Skipped):
                out["path"].append(result.path)
                out["size"].append(int(size))
                out["mtime_ns"].append(int(mtime))
                out["hash"].append("")
                out["width"].append(0)
                out["height"].append(0)
                out["pixels"].append(_NO_PIXELS)
                out["reason"].append(result.reason)
                out["transient"].append(result.transient)
                out["readable"].append(os.access(result.path, os.R_OK))
            else:
                out["path"].append(result.entry.path)
                out["size"].append(result.entry.size)
                out["mtime_ns"].append(result.entry.mtime_ns)
                out["hash"].append(result.content_hash)
                out["width"].append(result.width)
                out["height"].append(result.height)
                out["pixels"].append(_NO_PIXELS if result.pixels is None else result.pixels)
                out["reason"].append("")
                out["transient"].append(False)
                out["readable"].append(True)
        return out


class EncodeActor:
    """A Ray Data callable class: the model, loaded once per actor, embeds each batch of pixels."""

    def __init__(self, spec: Any, device: str, int8: bool, to_batch: Callable[[Sequence[Any]], Any]):
        from mmsearch.encode import load_encoder

        self.encoder = load_encoder(spec, device, int8=int8)
        self.to_batch = to_batch

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        pixels = batch["pixels"]
        todo = [i for i, p in enumerate(pixels) if np.asarray(p).size]
        vectors = np.zeros((len(pixels), self.encoder.dim), dtype=np.float32)
        if todo:
            vectors[todo] = self.encoder.embed_images(self.to_batch([pixels[i] for i in todo]))
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"] = vectors
        return out


def steps(
    todo: Sequence[FileEntry],
    *,
    per_image: Callable[[Any], Any],
    to_batch: Callable[[Sequence[Any]], Any],
    min_side: int,
    known: frozenset[str],
    max_bytes: int,
    spec: Any,
    device: str,
    int8: bool,
    batch_size: int,
    decoder_cls: type | None = None,
    encoder_cls: type | None = None,
) -> Iterator[tuple[list[Decoded | Skipped], np.ndarray | None, None]]:
    """The indexer's steps (files, vectors of the encoded ones, no token states) computed on Ray.

    Call inside :func:`connected`. Batches come back in the order they finish.
    """
    ray = _ray()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    actors = gpus if gpus else max(1, cpus // 2)
    ds = ray.data.from_items(
        [{"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns} for e in todo],
        override_num_blocks=max(1, min(len(todo) // batch_size + 1, 4 * cpus)),
    )
    ds = ds.map_batches((decoder_cls or Decoder)(per_image, min_side, known, max_bytes), batch_size=batch_size,
                        batch_format="numpy", num_cpus=1)
    ds = ds.map_batches(
        encoder_cls or EncodeActor,
        fn_constructor_args=(spec, device if gpus else "cpu", int8, to_batch),
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=actors,
        num_gpus=1 if gpus else 0,
        num_cpus=0 if gpus else 1,
        max_restarts=RETRIES,
        max_task_retries=RETRIES,
    )
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
        results: list[Decoded | Skipped] = []
        rows = []
        for i, path in enumerate(batch["path"]):
            path = str(path)
            entry = FileEntry(path, int(batch["size"][i]), int(batch["mtime_ns"][i]))
            reason = str(batch["reason"][i])
            if reason:
                if not bool(batch["readable"][i]) and os.access(path, os.R_OK):
                    raise SharedMountError(
                        f"a Ray worker cannot read {path}, which this machine can ({reason}); "
                        "the folders to index must be mounted at the same path on every node"
                    )
                results.append(Skipped(path, reason, transient=bool(batch["transient"][i])))
            elif not int(batch["width"][i]) and not int(batch["height"][i]) and str(batch["hash"][i]) in known:
                results.append(Decoded(entry, str(batch["hash"][i])))  # its vector is reused
            else:
                results.append(Decoded(entry, str(batch["hash"][i]), int(batch["width"][i]),
                                       int(batch["height"][i]), pixels=True))
                rows.append(i)
        vectors = np.asarray(batch["vector"])[rows] if rows else None
        yield results, vectors, None
