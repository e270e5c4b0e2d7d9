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

Tested with Ray 2.52; the actor pool is given as
``compute=ActorPoolStrategy(size=...)``, which Ray 2.40 to 2.52 all take
(2.51 deprecated ``concurrency`` for it).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
    own progress bars, info lines and tuning warnings are turned off for the process: the
    indexer's bar and skipped-file lines are the run's output.
    """
    import logging

    ray = _ray()
    context = ray.data.DataContext.get_current()  # imported here: Ray Data sets up its loggers on import
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    if ray.is_initialized():
        yield ray
        return
    if not address and not os.environ.get("RAY_ADDRESS"):
        # A cluster for this run only: no dashboard or metrics to feed, and
        # its workers run at the run's own priority, as a plain run's lanes do
        # (Ray lowers workers' priority by default, for clusters it shares).
        init_args.setdefault("include_dashboard", False)
        init_args.setdefault("_system_config", {"worker_niceness": 0, "enable_metrics_collection": False})
    try:
        with warnings.catch_warnings():  # a tip about a future release's GPU variables, not for our users
            warnings.simplefilter("ignore", FutureWarning)
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
    """A Ray Data callable class: the model, loaded once per actor, embeds each batch of pixels.

    Its share of the cores comes from its worker's environment, which Ray
    sets when it starts the process (see :func:`steps`). With
    ``tokens`` (their shape: tokens, dim) it also returns each image's token
    states for the re-ranker, zeros for a file it did not encode.
    """

    def __init__(self, spec: Any, device: str, int8: bool, to_batch: Callable[[Sequence[Any]], Any],
                 tokens: tuple[int, int] | None = None):
        from mmsearch.encode import load_encoder

        self.encoder = load_encoder(spec, device, int8=int8)
        self.to_batch, self.tokens = to_batch, tokens

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        pixels = batch["pixels"]
        todo = [i for i, p in enumerate(pixels) if np.asarray(p).size]
        vectors = np.zeros((len(pixels), self.encoder.dim), dtype=np.float32)
        states = np.zeros((len(pixels), *self.tokens), dtype=np.float16) if self.tokens else None
        if todo:
            images = self.to_batch([pixels[i] for i in todo])
            if states is not None:
                vectors[todo], states[todo] = self.encoder.embed_images_with_tokens(images)
            else:
                vectors[todo] = self.encoder.embed_images(images)
        out = {k: v for k, v in batch.items() if k != "pixels"}
        out["vector"] = vectors
        if states is not None:
            out["tokens"] = states
        return out


@dataclass(frozen=True)
class Plan:
    """How a run uses the cluster: encoding actors, and the CPUs each actor and decode task asks for."""

    actors: int
    gpus: bool
    actor_cpus: float
    threads: int  # torch threads per CPU actor (0: the actor's default)
    decode_cpus: float


#: Share of a CPU actor's cores left to the decode tasks that feed it.
DECODE_SHARE = 0.25
#: Encoding actors per node at most, as a plain run's lanes (mmsearch.indexer.cpu_lanes).
ACTORS_PER_NODE = 4


def plan(node_cpus: Sequence[float], gpus: int) -> Plan:
    """The pool for a cluster whose live nodes have ``node_cpus`` CPUs and ``gpus`` GPUs in all.

    With GPUs: one actor per GPU, decoding on the CPUs. Without: like a plain
    run's lanes, up to :data:`ACTORS_PER_NODE` actors per node, each with its
    node's share of the cores as torch threads, asking Ray for a quarter of a
    core less than that so the decode tasks feeding it fit beside it.
    """
    if gpus:
        return Plan(actors=gpus, gpus=True, actor_cpus=0, threads=0, decode_cpus=1)
    usable = [int(c) for c in node_cpus if c >= 1] or [1]
    per_node = [min(ACTORS_PER_NODE, c) for c in usable]
    threads = max(1, min(c // n for c, n in zip(usable, per_node)))
    return Plan(actors=sum(per_node), gpus=False, actor_cpus=threads - DECODE_SHARE, threads=threads,
                decode_cpus=DECODE_SHARE)


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
    tokens: tuple[int, int] | None = None,
    decoder_cls: type | None = None,
    encoder_cls: type | None = None,
) -> Iterator[tuple[list[Decoded | Skipped], np.ndarray | None, np.ndarray | None]]:
    """The indexer's steps (files, vectors of the encoded ones, their token states) computed on Ray.

    Call inside :func:`connected`. Token states come back only with
    ``tokens``, their shape (a model with a re-ranker). Batches come back in the order
    they finish; a batch is at most ``batch_size`` files, fewer when that
    keeps every actor busy to the end of a small run.
    """
    ray = _ray()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    pool = plan([n.get("Resources", {}).get("CPU", 0) for n in nodes],
                int(ray.cluster_resources().get("GPU", 0)))
    batch = max(1, min(batch_size, -(-len(todo) // (4 * pool.actors))))
    ds = ray.data.from_items(
        [{"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns} for e in todo],
        override_num_blocks=max(1, -(-len(todo) // batch)),
    )
    ds = ds.map_batches((decoder_cls or Decoder)(per_image, min_side, known, max_bytes), batch_size=batch,
                        batch_format="numpy", num_cpus=pool.decode_cpus)
    ds = ds.map_batches(
        encoder_cls or EncodeActor,
        fn_constructor_args=(spec, device if pool.gpus else "cpu", int8, to_batch, tokens),
        batch_size=batch,
        batch_format="numpy",
        # a CPU actor takes its next batch when it is free, so none waits while
        # another has two queued; a GPU actor keeps Ray's queue to stay fed
        compute=ray.data.ActorPoolStrategy(size=pool.actors, max_tasks_in_flight_per_actor=None if pool.gpus else 1),
        num_gpus=1 if pool.gpus else 0,
        num_cpus=pool.actor_cpus,
        # torch takes its threads from the environment its worker process starts with
        **({"runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(pool.threads)}}} if pool.threads else {}),
        max_restarts=RETRIES,
        max_task_retries=RETRIES,
    )
    # no prefetching: a finished batch is handed to the writer at once, not
    # when the next ones are ready too
    for batch_out in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        results: list[Decoded | Skipped] = []
        rows = []
        for i, path in enumerate(batch_out["path"]):
            path = str(path)
            entry = FileEntry(path, int(batch_out["size"][i]), int(batch_out["mtime_ns"][i]))
            reason = str(batch_out["reason"][i])
            if reason:
                if not bool(batch_out["readable"][i]) and os.access(path, os.R_OK):
                    raise SharedMountError(
                        f"a Ray worker cannot read {path}, which this machine can ({reason}); "
                        "the folders to index must be mounted at the same path on every node"
                    )
                results.append(Skipped(path, reason, transient=bool(batch_out["transient"][i])))
            elif not int(batch_out["width"][i]) and not int(batch_out["height"][i]) \
                    and str(batch_out["hash"][i]) in known:
                results.append(Decoded(entry, str(batch_out["hash"][i])))  # its vector is reused
            else:
                results.append(Decoded(entry, str(batch_out["hash"][i]), int(batch_out["width"][i]),
                                       int(batch_out["height"][i]), pixels=True))
                rows.append(i)
        vectors = np.asarray(batch_out["vector"])[rows] if rows else None
        states = np.asarray(batch_out["tokens"])[rows] if tokens and rows else None
        yield results, vectors, states
