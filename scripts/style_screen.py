"""Screen dual-encoder recipes for cross-style generalisation, without the re-ranker stage.

Trains ``mmsearch-small`` (with the architecture and training overrides given
on the command line) on one pair file with ``mmsearch.train``'s own loop and
evaluates the dual encoder alone on another (a style it never saw), both
directions, R@1/5/10. It is how the recipes in docs/reranker-experiments.md
were compared cheaply before full ``mmsearch train`` / ``eval`` runs:

    python scripts/style_screen.py /tmp/rr-emoji/without-facebook.jsonl /tmp/rr-emoji/facebook.jsonl \
        --image-size 64 --patch 16 --aug colour-safe --epochs 30

``--aug shipped`` uses ``mmsearch.train``'s augmentation (zoom 0.8-1.1x and
shift ±10%); ``--aug colour-safe`` the stronger one tried for issue 14 and not
shipped (it lowered Facebook recall; docs/reranker-experiments.md). Prints one
JSON object (options, seconds, recalls). A script, not a library call: it swaps
``mmsearch.train``'s augmentation for this process only.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
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


#: The colour-safe augmentation tried for issue 14 (see :func:`colour_safe_augment`).
CROP_SIDE = (0.7, 1.05)  # side of the random crop, as a share of the image's
CROP_ASPECT = (3 / 4, 4 / 3)
ROTATE_DEGREES = 10.0
BRIGHTNESS = 0.1  # added to all three channels alike, on the 0-1 scale
CONTRAST = (0.8, 1.2)  # scale about the image's grey level
FILTER_SHARE = 0.5  # share of images blurred or sharpened (3×3 Gaussian, strength up to 1)
ERASE_SHARE = 0.25  # share of images with one white rectangle (2-12% of the area)
ERASE_AREA = (0.02, 0.12)


def _uniform(n: int, bounds: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    return bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n, generator=gen)


def colour_safe_augment(x: torch.Tensor, gen: torch.Generator, mean: list[float], std: list[float]) -> torch.Tensor:
    """Random resized crop with a small rotation, brightness/contrast, blur or sharpen, and erasing, per image.

    Meant to let a model trained on some drawing styles recognise another
    artist's drawing of the same thing (at 30 epochs it did not: see
    docs/reranker-experiments.md). Colour-safe: every change treats the
    three channels alike (an equal shift, a scale about the grey level, a
    spatial filter, a white patch, no clipping), so hues survive; skin-tone
    variants and flags differ by colour alone, so hue shifts and grey-scale
    are left out. ``x`` is normalised with ``mean``/``std``; so is the result.
    No horizontal flips either: left and right arrows are different things.
    """
    n, _, h, w = x.shape
    device = x.device
    side = _uniform(n, CROP_SIDE, gen)
    aspect = torch.exp(_uniform(n, (math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])), gen))
    sx, sy = side * aspect.sqrt(), side / aspect.sqrt()
    # the crop's centre lies anywhere that keeps it inside the picture, plus a little slack
    tx = (torch.rand(n, generator=gen) * 2 - 1) * ((1 - sx).clamp(min=0) + 0.05)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * ((1 - sy).clamp(min=0) + 0.05)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(ROTATE_DEGREES)
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([
        torch.stack([sx * cos, -sy * sin, tx], dim=1),
        torch.stack([sx * sin, sy * cos, ty], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta.to(device), list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    x = x * s + m  # the 0-1 scale, where "alike for all channels" means hue-preserving
    grey = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = _uniform(n, CONTRAST, gen).view(n, 1, 1, 1).to(device)
    bright = _uniform(n, (-BRIGHTNESS, BRIGHTNESS), gen).view(n, 1, 1, 1).to(device)
    x = (x - grey) * contrast + grey + bright

    # a 3×3 Gaussian ([1, 2, 1] / 4 each way) as two shifted sums: many times faster than a grouped conv on a CPU
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = (padded[:, :, :-2] + 2 * padded[:, :, 1:-1] + padded[:, :, 2:]) / 4
    blurred = (rows[..., :-2] + 2 * rows[..., 1:-1] + rows[..., 2:]) / 4
    strength = (torch.rand(n, generator=gen) * 2 - 1) * (torch.rand(n, generator=gen) < FILTER_SHARE)
    x = x + strength.view(n, 1, 1, 1).to(device) * (blurred - x)  # > 0 blurs, < 0 sharpens

    area = _uniform(n, ERASE_AREA, gen) * h * w
    ratio = torch.exp(_uniform(n, (math.log(0.5), math.log(2.0)), gen))
    eh, ew = (area * ratio).sqrt().clamp(max=h), (area / ratio).sqrt().clamp(max=w)
    y0, x0 = torch.rand(n, generator=gen) * (h - eh), torch.rand(n, generator=gen) * (w - ew)
    erase = torch.rand(n, generator=gen) < ERASE_SHARE
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    box = ((ys >= y0.view(n, 1, 1)) & (ys < (y0 + eh).view(n, 1, 1))
           & (xs >= x0.view(n, 1, 1)) & (xs < (x0 + ew).view(n, 1, 1)) & erase.view(n, 1, 1))
    x = torch.where(box.unsqueeze(1).to(device), torch.ones((), device=device), x)
    return (x - m) / s


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


def _smoothed(loss_fn, smoothing: float):
    """``loss_fn`` (the shipped loss) with its image-text targets label-smoothed.

    Cross-entropy against ``(1 - smoothing) * target + smoothing * uniform`` is
    the plain term plus ``smoothing * (uniform term - plain term)``, which is
    what is added here; the image-image term is left as it is.
    """
    def loss(img_f, txt_f, scale, image_ids, text_ids):
        base = loss_fn(img_f, txt_f, scale, image_ids, text_ids)
        logits = scale * img_f @ txt_f.T
        uniform = 0.5 * (-F.log_softmax(logits, 1).mean(1).mean() - F.log_softmax(logits.T, 1).mean(1).mean())
        right = ((text_ids[:, None] == text_ids[None, :]) | (image_ids[:, None] == image_ids[None, :])).float()
        target = right / right.sum(1, keepdim=True)
        pos = 0.5 * (-(target * F.log_softmax(logits, 1)).sum(1).mean() - (target * F.log_softmax(logits.T, 1)).sum(1).mean())
        return base + smoothing * (uniform - pos)
    return loss


def _sibling_order(texts: list[str], group_size: int, share: float):
    """An epoch order whose batches hold groups of captions that share words (hard negatives).

    Captions are grouped greedily each epoch: a random unassigned caption and
    the ``group_size - 1`` unassigned ones most like it (the idf-weighted
    cosine of their words, random tie-breaks). ``share`` of the captions go
    in such groups, the rest alone; groups are shuffled, and each caption's
    pairs come in runs of two as in ``mmsearch.train._epoch_order``.
    """
    words = [set(t.lower().replace(":", " ").replace(",", " ").split()) for t in texts]
    vocab = {w: i for i, w in enumerate(sorted(set().union(*words)))}
    m = np.zeros((len(texts), len(vocab)), dtype=np.float32)
    for i, ws in enumerate(words):
        m[i, [vocab[w] for w in ws]] = 1
    m *= np.log(len(texts) / m.sum(0))[None, :]  # idf: "with" and "and" say little, "facepalming" a lot
    m /= np.linalg.norm(m, axis=1, keepdims=True) + 1e-9
    similar = m @ m.T
    np.fill_diagonal(similar, -1)

    def order(text_of: np.ndarray, gen: torch.Generator, run: int = 2) -> torch.Tensor:
        rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=gen)))
        present = np.unique(text_of)
        free = np.zeros(len(texts), dtype=bool)
        free[present] = True
        groups = []
        for i in rng.permutation(present):
            if not free[i]:
                continue
            free[i] = False
            members = [int(i)]
            if rng.random() < share:
                row = np.where(free, similar[i] + 1e-3 * rng.random(len(texts)), -np.inf)
                take = np.argpartition(-row, group_size - 1)[:group_size - 1]
                take = [int(t) for t in take if np.isfinite(row[t]) and row[t] > 0]
                free[take] = False
                members += take
            groups.append(members)
        by_text: dict[int, list[int]] = {}
        for k in torch.randperm(len(text_of), generator=gen).tolist():
            by_text.setdefault(int(text_of[k]), []).append(k)
        out = []
        rounds = max(math.ceil(len(ks) / run) for ks in by_text.values())
        for r in range(rounds):  # each round: every group, shuffled, with each caption's r-th run
            for g in rng.permutation(len(groups)):
                for t in groups[g]:
                    out += by_text[t][r * run:(r + 1) * run]
        return torch.tensor(out, dtype=torch.long)
    return order


def _mixstyle(share: float, alpha: float):
    """A forward hook that mixes per-image channel means and deviations between random images (Zhou et al., 2021).

    Only while training, on ``share`` of the batches: each image's feature map is
    normalised by its own statistics and re-scaled with a Beta(alpha, alpha)
    blend of its own and another random image's (statistics not differentiated).
    """
    beta = torch.distributions.Beta(alpha, alpha)

    def hook(module, inputs, x):
        if not module.training or torch.rand(()) >= share:
            return x
        n = x.shape[0]
        mu = x.mean(dim=(2, 3), keepdim=True).detach()
        sig = (x.var(dim=(2, 3), keepdim=True) + 1e-6).sqrt().detach()
        lam = beta.sample((n, 1, 1, 1)).to(x)
        perm = torch.randperm(n)
        mix_mu = lam * mu + (1 - lam) * mu[perm]
        mix_sig = lam * sig + (1 - lam) * sig[perm]
        return (x - mu) / sig * mix_sig + mix_mu

    return hook


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
    parser.add_argument("--layers", type=lambda v: [int(x) for x in v.split(",")] if "," in v else int(v),
                        default=None, help="vision layers: N (a ViT) or N,N,N,N (open_clip's ModifiedResNet stages)")
    parser.add_argument("--width", type=int, default=None, help="vision width")
    parser.add_argument("--text-layers", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=T.SMALL_EPOCHS)
    parser.add_argument("--batch", type=int, default=T.SMALL_BATCH)
    parser.add_argument("--lr", type=float, default=T.SMALL_LR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--aug", choices=("shipped", "shift", "colour-safe", "none"), default="shipped")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--order", choices=("random", "concept-pairs"), default="concept-pairs",
                        help="concept-pairs: mmsearch.train's own (runs of two of one caption); random: the old order")
    parser.add_argument("--loss", choices=("shipped", "concept"), default="shipped",
                        help="shipped: mmsearch.train's loss; concept: the screened variant with label smoothing")
    parser.add_argument("--image-loss", type=float, default=None,
                        help="weight of the image-image term (shipped: mmsearch.train.IMAGE_LOSS_WEIGHT; 0 turns it off)")
    parser.add_argument("--smoothing", type=float, default=0.0, help="label smoothing of the image-text targets (either loss)")
    parser.add_argument("--siblings", type=int, default=0,
                        help="batches hold groups of this many captions that share words (0: mmsearch.train's order)")
    parser.add_argument("--sibling-share", type=float, default=1.0, help="share of captions put in such groups")
    parser.add_argument("--ema", type=float, default=0.0,
                        help="evaluate an exponential moving average of the weights with this decay per step "
                             "(0: off, the trained weights themselves)")
    parser.add_argument("--run", type=int, default=None,
                        help="pairs of one caption kept side by side in a batch (mmsearch.train's order: 2)")
    parser.add_argument("--mixstyle", type=float, default=0.0,
                        help="MixStyle: the share of training batches whose ResNet features after the stages in "
                             "--mixstyle-stages get their channel statistics mixed between random images (0: off; "
                             "tried for issue 14 and not shipped: it lowered recall, docs/reranker-experiments.md)")
    parser.add_argument("--mixstyle-stages", default="1,2", help="ResNet stages (1-4) that MixStyle follows")
    parser.add_argument("--mixstyle-alpha", type=float, default=0.1, help="MixStyle's Beta(alpha, alpha) mixing weight")
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
    if args.aug == "none":
        T._augment = lambda x, gen: x
    if args.order == "random":  # mmsearch.train's own order is concept pairs
        T._epoch_order = lambda text_of, gen: torch.randperm(len(text_of), generator=gen)
    elif args.run is not None:
        T._epoch_order = functools.partial(T._epoch_order, run=args.run)
    if args.loss == "concept":
        T._contrastive_loss = _concept_loss(args.image_loss if args.image_loss is not None else 0.0, args.smoothing)
    elif args.image_loss is not None:
        T.IMAGE_LOSS_WEIGHT = args.image_loss
    if args.loss == "shipped" and args.smoothing:
        T._contrastive_loss = _smoothed(T._contrastive_loss, args.smoothing)
    torch.manual_seed(args.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(T.SMALL, vision_cfg=vision, text_cfg=text)
    tokenizer = open_clip.get_tokenizer(T.SMALL)
    size = vision["image_size"]
    if args.mixstyle:
        for stage in args.mixstyle_stages.split(","):
            getattr(model.visual, f"layer{stage}").register_forward_hook(_mixstyle(args.mixstyle, args.mixstyle_alpha))
    if args.aug == "colour-safe":
        mean, std = list(model.visual.preprocess_cfg["mean"]), list(model.visual.preprocess_cfg["std"])
        T._augment = lambda x, gen: colour_safe_augment(x, gen, mean, std)

    started = time.perf_counter()
    train_pairs, _ = T._split(read_pairs(args.train_pairs), 0.1, args.seed)
    images, texts, links = group(train_pairs)
    if args.siblings:
        T._epoch_order = _sibling_order(texts, args.siblings, args.sibling_share)
    pixels = T._load_pixels(images, preprocess, size)
    tokens = tokenizer(texts)
    image_of = np.array([i for i, _ in links], dtype=np.int64)
    text_of = np.array([j for _, j in links], dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="mmsearch-screen-") as tmp:
        opts = T.TrainOptions(pairs=args.train_pairs, out=Path(tmp), epochs=args.epochs, batch_size=args.batch,
                              lr=args.lr, seed=args.seed, augment="style" if args.aug == "shipped" else "shift")
        average = None
        if args.ema:
            from torch.optim.optimizer import register_optimizer_step_post_hook
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
            # parameters only: averaging the causal mask's -inf entries gives NaN; the buffers are copied after
            average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema), use_buffers=False)
            hook = register_optimizer_step_post_hook(
                lambda opt, a, k: average.update_parameters(model))
        T._train_dual(model, pixels, tokens, image_of, text_of, opts, args.lr, False, lambda m: None)
        if average is not None:
            hook.remove()
            for mine, theirs in zip(average.module.buffers(), model.buffers()):
                mine.copy_(theirs)
            model = average.module.eval()
    trained = time.perf_counter() - started
    result = _evaluate(model, tokenizer, preprocess, size, args.test_pairs)
    print(json.dumps({"options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                      "train_seconds": round(trained, 1), **result}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
