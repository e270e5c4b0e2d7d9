"""Screen dual-encoder recipes for cross-style generalisation, without the re-ranker stage.

Trains ``mmsearch-small`` (with the architecture and training overrides given
on the command line) on one pair file with ``mmsearch.train``'s own loop and
evaluates the dual encoder alone on another (a style it never saw), both
directions, R@1/5/10. It is how the recipes in docs/reranker-experiments.md
were compared cheaply before full ``mmsearch train`` / ``eval`` runs:

    python scripts/style_screen.py /tmp/rr-emoji/without-facebook.jsonl /tmp/rr-emoji/facebook.jsonl \
        --image-size 64 --patch 16 --epochs 10

``--aug old`` uses the augmentation shipped before issue 14 (zoom and shift
only); ``--aug default`` whatever ``mmsearch.train`` ships now. Prints one JSON
object (options, seconds, recalls). A script, not a library call: it swaps
``mmsearch.train``'s augmentation for this process only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mmsearch import train as T
from mmsearch.encode import register_model_configs
from mmsearch.evaluate import positive_ranks, recalls
from mmsearch.pairs import group, read_pairs
from mmsearch.towers import encode_text_tokens


def _old_augment(x: torch.Tensor, gen: torch.Generator, *_: object) -> torch.Tensor:
    """The augmentation before issue 14: zoom 0.8-1.1x and shift ±10%."""
    n = x.shape[0]
    scale = 0.8 + 0.3 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


def _concept_pairs_order(text_of: np.ndarray, gen: torch.Generator) -> torch.Tensor:
    """Pairs in runs of two of one concept (two styles of one caption side by side), runs shuffled."""
    by_text: dict[int, list[int]] = {}
    for k in torch.randperm(len(text_of), generator=gen).tolist():
        by_text.setdefault(int(text_of[k]), []).append(k)
    runs = [ks[s:s + 2] for ks in by_text.values() for s in range(0, len(ks), 2)]
    order = torch.randperm(len(runs), generator=gen).tolist()
    return torch.tensor([k for r in order for k in runs[r]], dtype=torch.long)


def _concept_loss(image_weight: float, smoothing: float):
    """Multi-positive InfoNCE by concept (same text or same image, both ways), label smoothing,
    plus an image-image term where two styles of one caption are positives."""

    def loss(img_f, txt_f, scale, image_ids, text_ids):
        logits = scale * img_f @ txt_f.T
        pos = ((text_ids[:, None] == text_ids[None, :]) | (image_ids[:, None] == image_ids[None, :])).float()
        target = pos / pos.sum(1, keepdim=True)
        if smoothing:
            target = (1 - smoothing) * target + smoothing / target.shape[1]
        out = 0.5 * (-(target * F.log_softmax(logits, 1)).sum(1).mean()
                     - (target.T * F.log_softmax(logits.T, 1)).sum(1).mean())
        if image_weight:
            same = (text_ids[:, None] == text_ids[None, :])
            eye = torch.eye(len(text_ids), dtype=torch.bool)
            other = same & ~eye
            rows = other.any(1)
            if rows.any():
                ii = (scale * img_f @ img_f.T).masked_fill(eye, -1e4)
                t = other[rows].float()
                t = t / t.sum(1, keepdim=True)
                out = out + image_weight * -(t * F.log_softmax(ii[rows], 1)).sum(1).mean()
        return out

    return loss


@torch.inference_mode()
def _evaluate(model, tokenizer, preprocess, size: int, pairs_file: Path) -> dict:
    images, texts, links = group(read_pairs(pairs_file))
    pixels = T._load_pixels(images, preprocess, size)
    img = torch.cat([F.normalize(model.encode_image(pixels[s:s + 256]), dim=-1) for s in range(0, len(pixels), 256)])
    txt = torch.cat([F.normalize(encode_text_tokens(model, tokenizer(texts[s:s + 256])), dim=-1)
                     for s in range(0, len(texts), 256)])
    pos = T._positives(images, texts, links)
    sims = (txt @ img.T).numpy()
    return {
        "text_to_image": recalls(positive_ranks(sims, pos)[pos.any(axis=1)]),
        "image_to_text": recalls(positive_ranks(np.ascontiguousarray(sims.T), np.ascontiguousarray(pos.T))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_pairs", type=Path)
    parser.add_argument("test_pairs", type=Path)
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--patch", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="vision layers")
    parser.add_argument("--width", type=int, default=None, help="vision width")
    parser.add_argument("--text-layers", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aug", choices=("old", "default", "none"), default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--order", choices=("random", "concept-pairs"), default="random")
    parser.add_argument("--loss", choices=("shipped", "concept"), default="shipped")
    parser.add_argument("--image-loss", type=float, default=0.0, help="weight of the image-image term (--loss concept)")
    parser.add_argument("--smoothing", type=float, default=0.0, help="label smoothing (--loss concept)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    register_model_configs()
    import open_clip

    cfg = open_clip.get_model_config(T.SMALL)
    vision, text = dict(cfg["vision_cfg"]), dict(cfg["text_cfg"])
    for key, value in (("image_size", args.image_size), ("patch_size", args.patch), ("layers", args.layers),
                       ("width", args.width)):
        if value is not None:
            vision[key] = value
    if args.text_layers is not None:
        text["layers"] = args.text_layers
    if args.aug == "old":
        T._augment = _old_augment
    elif args.aug == "none":
        T._augment = lambda x, gen, *_: x
    if args.order == "concept-pairs":
        T._epoch_order = _concept_pairs_order
    if args.loss == "concept":
        T._contrastive_loss = _concept_loss(args.image_loss, args.smoothing)
    torch.manual_seed(args.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(T.SMALL, vision_cfg=vision, text_cfg=text)
    tokenizer = open_clip.get_tokenizer(T.SMALL)
    size = vision["image_size"]

    started = time.perf_counter()
    train_pairs, _ = T._split(read_pairs(args.train_pairs), 0.1, args.seed)
    images, texts, links = group(train_pairs)
    pixels = T._load_pixels(images, preprocess, size)
    tokens = tokenizer(texts)
    image_of = np.array([i for i, _ in links], dtype=np.int64)
    text_of = np.array([j for _, j in links], dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="mmsearch-screen-") as tmp:
        opts = T.TrainOptions(pairs=args.train_pairs, out=Path(tmp), epochs=args.epochs, batch_size=args.batch,
                              lr=args.lr, seed=args.seed)
        T._train_dual(model, pixels, tokens, image_of, text_of, opts, args.lr, False, lambda m: None)
    trained = time.perf_counter() - started
    result = _evaluate(model, tokenizer, preprocess, size, args.test_pairs)
    print(json.dumps({"options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                      "train_seconds": round(trained, 1), **result}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
