"""Thread counts and OpenMP policy are the front end's, set once; library calls leave them alone."""

from __future__ import annotations

import numpy as np
import torch

from mmsearch.encode import load_encoder


def test_text_batches_leave_the_thread_count_alone_and_match(tiny_model):
    encoder = load_encoder(f"local-dir:{tiny_model}", "cpu")
    before = torch.get_num_threads()
    one = encoder.embed_texts(["red car"])
    assert torch.get_num_threads() == before
    many = encoder.embed_texts(["red car"] + [f"text {i}" for i in range(20)])
    assert np.allclose(one[0], many[0], atol=1e-5)


def _wait_policy_after(env_extra: dict[str, str]) -> str:
    """OMP_WAIT_POLICY in a fresh process after share_cores_with_decoding() and `import torch`."""
    import os
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from mmsearch.runtime import share_cores_with_decoding\n"
        "assert 'torch' not in sys.modules\n"
        "share_cores_with_decoding()\n"
        "import torch\n"
        "print(repr(os.environ.get('OMP_WAIT_POLICY')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env_extra
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return out.strip()


def test_indexing_makes_idle_openmp_threads_sleep_unless_the_user_chose():
    assert _wait_policy_after({}) == "'PASSIVE'"
    assert _wait_policy_after({"OMP_WAIT_POLICY": "ACTIVE"}) == "'ACTIVE'"
    assert _wait_policy_after({"OMP_WAIT_POLICY": ""}) == "''"


def test_threads_for_lanes_gives_each_new_thread_its_share_of_the_cores():
    """In a fresh process, as a front end does it at start-up."""
    import os
    import subprocess
    import sys

    code = (
        "import threading, torch\n"
        "from mmsearch.runtime import cpu_count, threads_for_lanes\n"
        "per_lane = threads_for_lanes(2)\n"
        "seen = []\n"
        "worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))\n"
        "worker.start(); worker.join()\n"
        "print(cpu_count(), per_lane, seen[0])\n"
    )
    cores, per_lane, seen = map(int, subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=dict(os.environ)
    ).stdout.split())
    assert per_lane == max(1, cores // 2) == seen
