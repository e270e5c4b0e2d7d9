"""The re-ranker's image tokens: the tower's forward pieces (now) against flipping ``output_tokens`` (before).

Before, ``image_token_states`` switched the shared tower's ``output_tokens`` on
for the length of a call, which raced between indexing lanes. Now it runs the
tower's own pieces. This times both ways on the same model and batch,
alternating, one thread, as an indexing lane runs:

    python bench/token_states.py                  # mmsearch-small (the shipped re-ranker's tower) and ViT-B-32
    python bench/token_states.py --rounds 11
"""

from __future__ import annotations

import argparse
import statistics
import time

from _common import machine, table, vit_b32_dir

import torch

from mmsearch.encode import load_encoder, register_model_configs
from mmsearch.towers import image_token_states


def flipped(model, pixels):
    """The code as it was: flip the tower's flag for one call (not thread-safe)."""
    visual = model.visual
    before = visual.output_tokens
    visual.output_tokens = True
    try:
        pooled, tokens = visual(pixels)
    finally:
        visual.output_tokens = before
    return pooled, tokens @ visual.proj


def small_model():
    import open_clip

    register_model_configs()
    return open_clip.create_model("mmsearch-small").eval(), 48


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7, help="alternating rounds; medians are reported")
    ap.add_argument("--batch", type=int, default=32, help="images per batch, as index runs them")
    args = ap.parse_args()
    torch.set_num_threads(1)  # one indexing lane on 2 cores
    print(machine())
    models = {"mmsearch-small (48 px)": small_model()}
    vit = load_encoder(f"local-dir:{vit_b32_dir()}", "cpu")
    models["ViT-B-32 (224 px)"] = (vit.model, 224)
    rows = []
    for name, (model, size) in models.items():
        pixels = torch.randn(args.batch, 3, size, size)
        reps = 20 if size < 100 else 1
        with torch.inference_mode():
            a, b = image_token_states(model, pixels), flipped(model, pixels)
            same = all(torch.equal(x, y) for x, y in zip(a, b))
            times: dict[str, list[float]] = {"pieces (now)": [], "flip (before)": []}
            for _ in range(args.rounds):
                for label, fn in (("pieces (now)", image_token_states), ("flip (before)", flipped)):
                    start = time.perf_counter()
                    for _ in range(reps):
                        fn(model, pixels)
                    times[label].append((time.perf_counter() - start) / reps * 1000)
        now, before = statistics.median(times["pieces (now)"]), statistics.median(times["flip (before)"])
        rows.append([name, args.batch, f"{now:.1f}", f"{before:.1f}", f"{now / before:.3f}", "yes" if same else "NO"])
    print(table(["model", "batch", "pieces ms", "flip ms", "ratio", "identical"], rows))


if __name__ == "__main__":
    main()
