"""Text encoding in float32 against bfloat16 (``--text-precision``), side by side.

ViT-B-32's text tower (random weights; speed does not depend on them) loaded
twice, once per precision, on one torch thread as a served query runs:
one short query at a time (a search) and batches of 256 captions (a corpus
for add-texts), taking turns so load on a shared machine hits both alike.
Also the lowest cosine between the two precisions' vectors of the same text.

    python bench/text_precision.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from _common import machine, percentiles, table, vit_b32_dir

QUERIES = ["red car", "a dog on a beach", "sunset over the sea", "birthday cake with candles",
           "two people at a wedding", "a small brown dog running across a sandy beach at sunset"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=80, help="single queries per precision")
    ap.add_argument("--batches", type=int, default=4, help="256-caption batches per precision")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args()
    print(machine())
    import torch

    from mmsearch.encode import load_encoder
    from mmsearch.towers import native_bfloat16

    torch.set_num_threads(args.threads)
    print(f"torch threads: {torch.get_num_threads()}; native bfloat16 on this CPU: {native_bfloat16('cpu')}")
    spec = f"local-dir:{vit_b32_dir()}"
    encoders = {p: load_encoder(spec, "cpu", text_precision=p) for p in ("float32", "bfloat16")}
    corpus = [f"{q} number {i}" for i in range(256) for q in QUERIES[:1]]
    single: dict[str, list[float]] = {p: [] for p in encoders}
    batch: dict[str, list[float]] = {p: [] for p in encoders}
    for enc in encoders.values():
        enc.embed_texts(QUERIES[:2])
    for i in range(args.reps):
        for p, enc in encoders.items():
            t0 = time.perf_counter()
            enc.embed_texts([QUERIES[i % len(QUERIES)]])
            single[p].append(time.perf_counter() - t0)
    for _ in range(args.batches):
        for p, enc in encoders.items():
            t0 = time.perf_counter()
            enc.embed_texts(corpus)
            batch[p].append(time.perf_counter() - t0)
    a = encoders["float32"].embed_texts(QUERIES + corpus)
    b = encoders["bfloat16"].embed_texts(QUERIES + corpus)
    cos = float(np.min(np.sum(a * b, axis=1)))
    rows = []
    for p in encoders:
        p50, p95 = percentiles(single[p])
        rate = 256 / float(np.median(batch[p]))
        rows.append([p, f"{p50:.2f}", f"{p95:.2f}", f"{rate:.0f}"])
    print(table(["precision", "query p50 ms", "query p95 ms", "texts/s (batches of 256)"], rows))
    f50, _ = percentiles(single["float32"])
    b50, _ = percentiles(single["bfloat16"])
    speed = float(np.median(batch["float32"]) / np.median(batch["bfloat16"]))
    print(f"min cosine float32 vs bfloat16: {cos:.6f}; corpus encoding bfloat16 / float32 rate: {speed:.2f}x")
    print(f"KEY: short query p50 bfloat16 / float32 = {b50 / f50:.2f} ({b50:.1f} vs {f50:.1f} ms)")


if __name__ == "__main__":
    main()
