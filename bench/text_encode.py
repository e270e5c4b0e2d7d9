"""Text query encoding latency: truncated at the real token length vs padded to 77 tokens.

ViT-B-32's text tower (random weights; speed does not depend on them), one
query at a time as a search does, warm.

    python bench/text_encode.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import machine, percentiles, table, vit_b32_dir

from mmsearch.encode import load_encoder
from mmsearch.towers import real_length

QUERIES = {
    "short (2-4 words)": ["red car", "a dog on a beach", "sunset", "birthday cake with candles"],
    "medium (~12 words)": ["a small brown dog running across a sandy beach at sunset with waves"],
    "long (~40 words)": [" ".join(["a crowded market street in the old town"] * 5)],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    args = ap.parse_args()
    print(machine())
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}")
    encoder = load_encoder(f"local-dir:{vit_b32_dir()}", "cpu")
    rows, key = [], None
    for label, texts in QUERIES.items():
        tokens = max(real_length(encoder.tokenize([t])) for t in texts)
        timings = {}
        for truncate in (True, False, True, False):  # interleaved, twice, to even out noise
            for t in texts[:2]:
                encoder.embed_texts([t], truncate=truncate)
            samples = timings.setdefault(truncate, [])
            for i in range(args.reps // 2):
                text = texts[i % len(texts)]
                t0 = time.perf_counter()
                encoder.embed_texts([text], truncate=truncate)
                samples.append(time.perf_counter() - t0)
        a = encoder.embed_texts(texts, truncate=True)
        b = encoder.embed_texts(texts, truncate=False)
        cos = float(np.min(np.sum(a * b, axis=1)))
        t50, t95 = percentiles(timings[True])
        p50, p95 = percentiles(timings[False])
        rows.append([label, tokens, f"{t50:.2f}", f"{t95:.2f}", f"{p50:.2f}", f"{p95:.2f}", f"{t50 / p50:.2f}", f"{cos:.6f}"])
        if key is None:
            key = t50 / p50
    print(table(["query", "tokens", "trunc p50 ms", "trunc p95", "padded p50 ms", "padded p95", "ratio", "min cosine"], rows))
    print(f"KEY: short queries, truncated / 77-token padded = {key:.2f} (target <= 0.5)")


if __name__ == "__main__":
    main()
