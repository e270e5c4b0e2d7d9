"""Process set-up for front ends: thread counts, OpenMP policy, logging, the Hub's offline mode.

These are settings of the whole process. The library never touches them (a
server answers queries from many threads with one model, and a call that
changed them would change them for every other thread); each front end (the
CLI, ``mmsearch serve``, a Ray worker) calls what it needs from here once, at
start-up, before it uses the library.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)


def cpu_count() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def share_cores_with_decoding() -> bool:
    """Make torch's OpenMP threads sleep, not spin, between ops; call before torch is imported.

    Indexing decodes images beside the model on the same cores; an idle
    OpenMP thread that spins holds a core the decoders need (measured in
    bench/index_throughput.py, see the README). The policy is read when the
    OpenMP runtime loads, so this does nothing once torch is imported, or when
    the user set ``OMP_WAIT_POLICY`` already. Returns whether the policy is now
    passive.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def set_torch_threads(threads: int) -> int:
    """torch's CPU threads for this process, and for every thread that starts using torch later."""
    import torch

    threads = max(1, int(threads))
    torch.set_num_threads(threads)
    return threads


def threads_for_lanes(lanes: int) -> int:
    """Give each of ``lanes`` indexing lanes its share of the cores; returns the threads per lane.

    A thread that starts using torch takes the process's thread count, so the
    lanes that :func:`mmsearch.indexer.index_paths` starts run one OpenMP team
    each of this size, never sharing a core between two teams.
    """
    return set_torch_threads(max(1, cpu_count() // max(1, lanes)))


class _DropOpenClipRecords(logging.Filter):
    """open_clip logs a failed download on the root logger; mmsearch says it as its own error line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}open_clip{os.sep}" not in record.pathname


def route_logging(level: int = logging.WARNING) -> None:
    """Warnings and errors of every library to stderr, once, without open_clip's load chatter."""
    root = logging.getLogger()
    if any(isinstance(f, _DropOpenClipRecords) for h in root.handlers for f in h.filters):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(_DropOpenClipRecords())
    handler.setLevel(level)
    root.addHandler(handler)


def quiet_library_warnings() -> None:
    """Silence the warnings Pillow and torch's quantisation give on files and calls mmsearch handles.

    Pillow warns about odd EXIF data and palette transparency while decoding
    (mmsearch orients and converts every image itself; errors still raise),
    ``torch.ao.quantization`` announces its deprecation on every call, and
    a resumed training run fast-forwards its learning-rate schedule.
    ``warnings.catch_warnings`` around each call would swap the process's
    filter list from many decode threads at once, and can leave it changed
    for good, so the filters are added here, once.
    """
    import warnings

    warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
    warnings.filterwarnings("ignore", module=r"torch\.ao(\.|$)")
    # `train` resuming from a checkpoint fast-forwards its learning-rate schedule
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before", category=UserWarning)


def hub_offline_unless_reachable(timeout: float = 3.0) -> bool:
    """Put huggingface_hub in offline mode (cache only) when its endpoint cannot be reached.

    With no network, a download of pretrained weights retried for the better
    part of a minute before failing; probing the endpoint first fails in
    ``timeout`` seconds, and cached weights still load. Not probed when
    ``HF_HUB_OFFLINE`` is set or a proxy is configured (a direct connection
    proves nothing then). Returns whether the hub is now offline.
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


def prepare_model_access(spec: object) -> None:
    """Before a front end loads ``spec``: probe the Hub once if the weights may come from it."""
    if getattr(spec, "kind", None) in ("pretrained", "hf-hub"):
        hub_offline_unless_reachable()
