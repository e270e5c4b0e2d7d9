"""int8 image tower (`--int8`) vs float32: throughput side by side, embedding agreement, retrieval quality.

Throughput and cosine use open_clip's ViT-B-32 with random weights on
preprocessed tensors at the indexing batch size, the two encoders timed in
alternating rounds in one process. With ``--pairs`` (and ``--model``, a
trained model folder), Recall@1/5/10 of `mmsearch eval` are computed both ways
on that pair file, the quality check that must pass before int8 could become
the default.

    python bench/int8.py
    python bench/int8.py --pairs /tmp/emoji/facebook.jsonl --model /tmp/emoji-model
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine, table, vit_b32_dir

from mmsearch.encode import load_encoder


def throughput(batch: int, rounds: int) -> tuple[list[list[object]], float]:
    import torch

    spec = f"local-dir:{vit_b32_dir()}"
    encoders = {"float32": load_encoder(spec, "cpu"), "int8": load_encoder(spec, "cpu", int8=True)}
    pixels = torch.randn(batch, 3, 224, 224)
    vectors = {name: enc.embed_images(pixels) for name, enc in encoders.items()}  # also warms up
    rates: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(rounds):
        for name, enc in encoders.items():
            t0 = time.perf_counter()
            enc.embed_images(pixels)
            rates[name].append(batch / (time.perf_counter() - t0))
    cos = np.sum(vectors["float32"] * vectors["int8"], axis=1)
    rows = [[name, " ".join(f"{r:.1f}" for r in rs), f"{np.median(rs):.2f}"] for name, rs in rates.items()]
    ratio = float(np.median(rates["int8"]) / np.median(rates["float32"]))
    rows.append(["int8 / float32", "", f"{ratio:.2f}x"])
    rows.append(["cosine int8 vs float32", f"min {cos.min():.5f}", f"mean {cos.mean():.5f}"])
    return rows, ratio


def quality(pairs: Path, model: str) -> list[list[object]]:
    from mmsearch.evaluate import evaluate
    from mmsearch.settings import resolve

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = resolve(home=Path(tmp) / "unused", model=model, device="cpu")
        for int8 in (False, True):
            result = evaluate(pairs, dataclasses.replace(base, int8=int8), progress=False)
            for key in ("text_to_image", "image_to_text"):
                r = result[key]
                rows.append([("int8" if int8 else "float32"), key, r["R@1"], r["R@5"], r["R@10"]])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=Path, help="a pair file to compare Recall@K on (needs --model)")
    ap.add_argument("--model", help="a trained model spec for --pairs")
    args = ap.parse_args()
    print(machine())
    rows, ratio = throughput(args.batch_size, args.rounds)
    print(table(["image tower, ViT-B-32", f"img/s per round (batch {args.batch_size})", "median"], rows))
    if args.pairs is not None:
        if not args.model:
            ap.error("--pairs needs --model")
        print(table(["encoder", "direction", "R@1", "R@5", "R@10"], quality(args.pairs, args.model)))
    print(f"KEY: int8 / float32 image throughput = {ratio:.2f}x (target >= 1.5x with cosine >= 0.99)")


if __name__ == "__main__":
    main()
