"""One `mmsearch train` step of the shipped small recipe, before and after its speed-ups, side by side.

The step of ``mmsearch.train._train_dual`` on a batch of 128 real pairs
(``--pairs``, e.g. the emoji set's ``all.jsonl``): the zoom/shift, the
drawing-style augmentation, both towers forward, the loss, backward, AdamW.
Two set-ups of the same model, taking turns step by step so that load on a
shared machine hits both alike:

- *before*: the image tower in the usual (NCHW) layout, AdamW's per-tensor
  ``foreach`` loop, the augmentation's 3×3 max/mean filters by
  ``F.max_pool2d`` / ``F.avg_pool2d``, the text tower over every pair's copy
  of its text;
- *after* (what ``train`` runs): the ResNet channels-last, fused AdamW, the
  filters as separable shifted sums (``train._max3`` / ``train._blur3``), each
  of the batch's distinct texts through the text tower once
  (``train._text_features``).

    python bench/train_step.py --pairs /tmp/emoji/all.jsonl --threads 2

Prints the median time of each part and, last, the ratio of the medians.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _common import machine, table

from mmsearch import train as T
from mmsearch.pairs import group, read_pairs
from mmsearch.towers import encode_text_tokens

PARTS = ("augment", "forward", "backward", "optimiser", "step")


def old_max3(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, 1, 1)


def old_blur3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


class Setup:
    def __init__(self, model: torch.nn.Module, after: bool, lr: float = 1e-3):
        self.model, self.after = model, after
        self.layout = T._conv_layout(model) if after else torch.contiguous_format
        model.visual.to(memory_format=self.layout)
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        kernel = T._adamw_kernel("cpu") if after else {"foreach": True}
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                     lr=lr, betas=(0.9, 0.98), eps=1e-6, **kernel)

    def step(self, pixels, tokens, image_t, text_t, idx, gen, mean, std) -> dict[str, float]:
        model = self.model
        model.train()
        t0 = time.perf_counter()
        saved = T._max3, T._blur3
        if not self.after:
            T._max3, T._blur3 = old_max3, old_blur3
        try:
            imgs = T._restyle(T._augment(pixels[image_t[idx]], gen), gen, mean, std)
        finally:
            T._max3, T._blur3 = saved
        imgs = imgs.contiguous(memory_format=self.layout)
        t1 = time.perf_counter()
        img_f = F.normalize(model.encode_image(imgs), dim=-1)
        if self.after:
            txt_f = T._text_features(model, tokens, text_t[idx], "cpu")
        else:
            txt_f = F.normalize(encode_text_tokens(model, tokens[text_t[idx]]), dim=-1)
        loss = T._contrastive_loss(img_f, txt_f, model.logit_scale.exp().clamp(max=100), image_t[idx], text_t[idx])
        t2 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        self.opt.step()
        t4 = time.perf_counter()
        return {"augment": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimiser": t4 - t3, "step": t4 - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=Path, required=True, help="a pair file (JSONL/CSV) of images and captions")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per set-up (after 3 warm-up steps)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (train uses the machine's default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    print(f"torch threads: {args.threads}, batch {args.batch}, {args.steps} timed steps each")

    torch.manual_seed(0)
    model, tokenizer, _, preprocess_cfg, preprocess = T._base_model("small", "cpu")
    images, texts, links = group(read_pairs(args.pairs))
    links = links[: 8 * args.batch]
    used = sorted({i for i, _ in links})
    pixels = T._load_pixels([images[i] for i in used], preprocess, int(preprocess_cfg["size"]))
    where = {i: k for k, i in enumerate(used)}
    image_t = torch.tensor([where[i] for i, _ in links])
    text_of = np.array([j for _, j in links])
    text_t = torch.from_numpy(text_of)
    tokens = tokenizer(texts)
    mean, std = list(preprocess_cfg["mean"]), list(preprocess_cfg["std"])

    setups = {"before": Setup(copy.deepcopy(model), after=False), "after": Setup(model, after=True)}
    times: dict[str, list[dict[str, float]]] = {name: [] for name in setups}
    gen = torch.Generator().manual_seed(0)
    for n in range(args.steps + 3):
        order = T._epoch_order(text_of, gen)
        idx = order[: args.batch]
        for name in (setups if n % 2 == 0 else reversed(list(setups))):
            seed = int(torch.randint(0, 2**31, (1,), generator=gen))
            timing = setups[name].step(pixels, tokens, image_t, text_t, idx, torch.Generator().manual_seed(seed), mean, std)
            if n >= 3:
                times[name].append(timing)

    med = {name: {part: statistics.median(t[part] for t in times[name]) * 1000 for part in PARTS} for name in setups}
    rows = [[part, f"{med['before'][part]:.0f}", f"{med['after'][part]:.0f}"] for part in PARTS]
    print(table(["part (median ms)", "before", "after"], rows))
    print(f"step time after / before: {med['after']['step'] / med['before']['step']:.2f}×")


if __name__ == "__main__":
    main()
