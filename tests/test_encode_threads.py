"""A short text query runs single-threaded on the CPU, and the thread count is restored."""

from __future__ import annotations

import numpy as np
import torch

from mmsearch.encode import load_encoder


def test_small_text_batch_restores_threads_and_matches(tiny_model):
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
        "from mmsearch.encode import share_cores_with_decoding\n"
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


def test_threads_per_lane_splits_the_cores_for_new_threads_and_restores():
    import threading

    from mmsearch.encode import threads_per_lane

    before = torch.get_num_threads()
    seen: list[int] = []
    with threads_per_lane(64) as lanes:
        worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        worker.start()
        worker.join()
    assert lanes == before  # never more lanes than threads
    assert seen == [1]
    assert torch.get_num_threads() == before
