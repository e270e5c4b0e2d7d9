"""Fault injection for the crash and concurrency tests: run the real CLI in a child
process that SIGKILLs itself (or slows down) at a chosen point of its work.

Children are forked from a forkserver that imported torch and mmsearch once,
so each one starts in a fraction of a second instead of ~8 s. Nothing here is
imported by mmsearch itself: the faults are monkeypatches inside the child.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
from typing import Any

PRELOAD = [
    "torch", "open_clip", "faiss", "mmsearch.cli", "mmsearch.indexer", "mmsearch.encode", "mmsearch.reindex", "faults",
]


def context() -> Any:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_for(path: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)


def _after_calls(owner: Any, name: str, n: int, action: Any, before: bool = False) -> None:
    """Run ``action`` on the ``n``-th call of ``owner.name`` (before or after the real call)."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if before and calls["n"] == n:
            action()
        result = original(*args, **kwargs)
        if not before and calls["n"] == n:
            action()
        return result

    setattr(owner, name, wrapper)


def install(fault: str) -> None:
    """Faults: ``after-batch:N`` (catalog batch N committed), ``in-transaction:N``
    (inside the N-th catalog transaction), ``decode:N`` (N-th file read),
    ``rename:N`` (before the N-th atomic rename of an index save),
    ``hold:N:PATH`` (after batch N is committed, wait until PATH exists), ``none``.
    Of ``reindex``: ``stage:N`` (staged batch N committed), ``in-switch`` (every
    statement of the switch run, before its commit), ``after-switch`` (the
    switch committed, before the FAISS files and tokens follow),
    ``stage-hold:N:PATH`` (after staged batch N, wait until PATH exists)."""
    import mmsearch.indexer as indexer
    import mmsearch.staging as staging
    import mmsearch.store as store

    kind, _, arg = fault.partition(":")
    if kind == "after-batch":
        _after_calls(store.Catalog, "write_images", int(arg), _die)
    elif kind == "in-transaction":
        _after_calls(store, "_bump_generation", int(arg), _die)
    elif kind == "decode":
        _after_calls(indexer, "decode_file", int(arg), _die, before=True)
    elif kind == "rename":
        _after_calls(os, "replace", int(arg), _die, before=True)
    elif kind == "hold":
        batches, _, gate = arg.partition(":")
        _after_calls(store.Catalog, "write_images", int(batches), lambda: _wait_for(gate))
    elif kind == "stage":
        _after_calls(staging.Staging, "put", int(arg), _die)
    elif kind == "stage-hold":
        batches, _, gate = arg.partition(":")
        _after_calls(staging.Staging, "put", int(batches), lambda: _wait_for(gate))
    elif kind == "after-switch":
        _after_calls(staging.Staging, "switch", 1, _die)
    elif kind == "in-switch":
        _die_before_commit(staging.Staging)
    elif kind != "none":
        raise ValueError(fault)


def _die_before_commit(staging_class: Any) -> None:
    """Kill the process inside the switch's transaction, after its last statement, before the commit."""
    from contextlib import contextmanager

    original = staging_class.switch

    def switch(self: Any, *args: Any, **kwargs: Any) -> Any:
        real = self.catalog.transaction

        @contextmanager
        def dying() -> Any:
            with real() as conn:
                yield conn
                _die()

        self.catalog.transaction = dying
        return original(self, *args, **kwargs)

    staging_class.switch = switch


def run_cli(args: list[str], fault: str, env: dict[str, str]) -> None:
    """The child: the real ``mmsearch`` command line, with one fault installed."""
    os.environ.update(env)
    install(fault)
    from mmsearch.cli import app

    app(args=args, prog_name="mmsearch")


def start(args: list[str], fault: str = "none") -> Any:
    """Start ``mmsearch ARGS`` in a child process with ``fault``; returns the Process."""
    env = {k: v for k, v in os.environ.items() if k.startswith(("MMSEARCH_", "HF_", "XDG_"))}
    process = context().Process(target=run_cli, args=(args, fault, env))
    process.start()
    return process
