"""Training: fit a dual encoder and its cross-attention re-ranker on your own image–caption pairs.

1. A seeded part of the pairs is held out for validation.
2. The dual encoder is trained contrastively (symmetric InfoNCE with the
   model's learnable temperature, plus an image-image term for images that
   share a caption), from ``--base`` (any model spec) or from scratch with
   the shipped ``small`` architecture (a small open_clip ResNet image tower).
   A checkpoint is written after every epoch, so an interrupted run resumes
   where it stopped.
3. The frozen dual encoder mines hard negatives (its own top candidates, what
   the re-ranker will see at query time) and the re-ranker learns to correct
   its scores on them.
4. The re-ranker is kept only if it does not lower validation Recall@1 in
   either direction; the model folder works as ``--model DIR``.

A CoCa base (``--base coca_ViT-B-32:laion2b_s13b_b90k``) re-ranks with its
own captioning decoder: its dual-encoder epochs add CoCa's captioning loss,
and instead of a cross-attention scorer ``train`` fits the weight that fuses
the decoder's log-likelihood with the contrastive score, per direction, on
the dual encoder's top candidates (``--epochs 0`` fits only that).

Everything is written as safetensors + JSON; nothing is pickled.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from mmsearch.errors import InputFileError, UsageError
from mmsearch.evaluate import combined, everywhere, positive_ranks, recalls, scorer_corrections, text_states_padded
from mmsearch.exemplars import (
    EXEMPLAR_CONFIG, EXEMPLAR_WEIGHTS, ExemplarMemory, fit_weights, leave_one_out_table, unrelated_mean,
    weighted_corrections,
)
from mmsearch.pairs import Pair, group, read_pairs
from mmsearch.rerank import DIRECTIONS, CaptionReranker, CrossAttentionScorer, save_caption_weights, save_scorer
from mmsearch.towers import caption_log_likelihood, coca_text_states, encode_text_tokens, image_token_states, is_coca

SMALL = "mmsearch-small"
ARROWS = {"text_to_image": "text→image", "image_to_text": "image→text"}
#: Default dual-encoder epochs: from scratch (``--base small``), and fine-tuning a pretrained base.
SMALL_EPOCHS = 35
BASE_EPOCHS = 30
#: Default pairs per contrastive batch: from scratch on a set of at least SMALL_BATCH_STEPS such
#: batches, else (and fine-tuning a base) BASE_BATCH, so that a small set still gets several steps an epoch.
SMALL_BATCH, BASE_BATCH, SMALL_BATCH_STEPS = 256, 128, 8
#: Default learning rates from scratch (batches of SMALL_BATCH or more, and smaller ones) and from a base.
SMALL_LR, SMALL_LR_FEW, BASE_LR = 1.4e-3, 1e-3, 1e-5
#: Candidate weights of the CoCa fusion (log-likelihood against logit_scale × cosine).
CAPTION_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
#: CoCa's own balance of its captioning loss against the contrastive one.
CAPTION_LOSS_WEIGHT = 2.0
CHECKPOINT = ".checkpoint"
INFO_FILE = "mmsearch_model.json"


def default_batch(scratch: bool, train_pairs: int) -> int:
    """Pairs per batch when ``--train-batch`` is not given."""
    return SMALL_BATCH if scratch and train_pairs >= SMALL_BATCH * SMALL_BATCH_STEPS else BASE_BATCH


def default_lr(scratch: bool, batch: int) -> float:
    """The learning rate when ``--lr`` is not given."""
    if not scratch:
        return BASE_LR
    return SMALL_LR if batch >= SMALL_BATCH else SMALL_LR_FEW


@dataclass
class TrainOptions:
    pairs: Path
    out: Path
    base: str = "small"
    epochs: int | None = None  # default: SMALL_EPOCHS from scratch, BASE_EPOCHS from a pretrained base
    augment: str | None = None  # one of AUGMENTS; default: style from scratch, shift from a pretrained base
    batch_size: int | None = None  # default: default_batch()
    lr: float | None = None  # default: default_lr()
    seed: int = 0
    val_fraction: float = 0.1
    rerank_epochs: int = 2
    negatives: int = 15
    mine_k: int = 50
    dual_dropout: float = 0.0  # share of re-ranker training queries that see no dual score
    fit_queries: int = 256  # per direction, for fitting a CoCa model's fusion weights
    device: str = "cpu"


@dataclass
class TrainReport:
    out: str
    train_pairs: int
    val_pairs: int
    epochs: int
    resumed_from_epoch: int
    seconds: float
    val_dual: dict[str, dict[str, float]] = field(default_factory=dict)
    val_rerank: dict[str, dict[str, float]] = field(default_factory=dict)
    reranker_saved: bool = False
    #: the directions the saved re-ranker re-scores (the others keep the dual-encoder ranking)
    reranker_directions: list[str] = field(default_factory=list)
    #: per direction, the weight of the exemplar memory (mmsearch.exemplars; 0: not used)
    exemplar_weights: dict[str, float] = field(default_factory=dict)
    #: subtracted from each exemplar similarity (mmsearch.exemplars.ExemplarMemory.offset)
    exemplar_offset: float = 0.0
    #: validation recalls with everything saved (kept re-ranker directions plus exemplars)
    val_saved: dict[str, dict[str, float]] = field(default_factory=dict)
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 1)
        return out


# -- model set-up ----------------------------------------------------------------


def _base_model(base: str, device: str) -> tuple[Any, Any, dict[str, Any], dict[str, Any], Callable]:
    """(model, tokenizer, model_cfg, preprocess_cfg, preprocess) for ``--base``."""
    import open_clip

    from mmsearch.encode import load_encoder, register_model_configs
    from mmsearch.modelspec import parse

    register_model_configs()
    if base == "small":
        # open_clip logs that no pretrained weights were loaded (intended here);
        # the CLI's log handler drops open_clip's records (mmsearch.runtime)
        model, _, preprocess = open_clip.create_model_and_transforms(SMALL, device=device)
        tokenizer = open_clip.get_tokenizer(SMALL)
        model_cfg = open_clip.get_model_config(SMALL)
    else:
        spec = parse(base)
        # float32 throughout: training changes the weights a bfloat16 copy would hold
        encoder = load_encoder(spec, device, text_precision="float32")
        model, tokenizer, preprocess = encoder.model, encoder.tokenizer, encoder.preprocess
        if spec.kind == "local-dir":
            assert spec.path is not None
            model_cfg = json.loads((spec.path / "open_clip_config.json").read_text())["model_cfg"]
        elif spec.kind == "hf-hub":
            from open_clip.factory import _get_hf_config

            model_cfg = _get_hf_config(spec.name)["model_cfg"]
        else:
            model_cfg = open_clip.get_model_config(spec.name)
    preprocess_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(model.visual.preprocess_cfg).items()}
    return model, tokenizer, model_cfg, preprocess_cfg, preprocess


def _load_pixels(pairs_images: list[Path], preprocess: Callable, size: int) -> torch.Tensor:
    from mmsearch.decode import enable_heif, load_image

    enable_heif()
    out = []
    for path in pairs_images:
        try:
            out.append(preprocess(load_image(str(path), size)))
        except Exception as exc:
            raise InputFileError(f"{path} is not an image this tool can read ({type(exc).__name__})") from None
    return torch.stack(out)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random zoom (0.8–1.1×) and shift (±10%) per image, one batched resample."""
    n = x.shape[0]
    scale = 0.8 + 0.3 * torch.rand(n, generator=gen)
    shift = (torch.rand(n, 2, generator=gen) - 0.5) * 0.2
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


#: ``--augment style``: the share of images given dark outlines (1 px; 2 px for a third of those).
OUTLINE_SHARE = 0.3
#: ... shaded by a linear ramp across the picture, of this half-height (a factor about 1).
SHADE_SHARE, SHADE = 0.3, 0.25
#: ... blurred (3×3) and posterised into flat fills of 3-6 levels per channel.
FLATTEN_SHARE, LEVELS = 0.3, (3, 6)
#: The range of the scale of each pixel's distance from its own grey (saturation).
SATURATION = (0.6, 1.4)
#: ``--augment`` values: style (zoom, shift and a random drawing style) or shift (zoom and shift only).
AUGMENTS = ("style", "shift")


def _max3(x: torch.Tensor) -> torch.Tensor:
    """Each pixel's largest value over its 3×3 neighbourhood inside the picture (max-pooling, stride 1).

    Two separable passes over shifted views: on CPU several times faster than
    ``F.max_pool2d`` at these sizes, with the same values.
    """
    p = F.pad(x, (1, 1, 1, 1), value=-math.inf)
    rows = torch.maximum(torch.maximum(p[..., :, :-2], p[..., :, 1:-1]), p[..., :, 2:])
    return torch.maximum(torch.maximum(rows[..., :-2, :], rows[..., 1:-1, :]), rows[..., 2:, :])


def _blur3(x: torch.Tensor) -> torch.Tensor:
    """The 3×3 mean of each pixel, edges repeated (as ``F.avg_pool2d`` of a replicate-padded picture)."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    rows = p[..., :, :-2] + p[..., :, 1:-1] + p[..., :, 2:]
    return (rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]) / 9


def _restyle(x: torch.Tensor, gen: torch.Generator, mean: list[float], std: list[float]) -> torch.Tensor:
    """A random change of drawing style per image (``x`` normalised with ``mean``/``std``; so is the result).

    Drawings of one thing by different artists differ in line and fill more
    than in what they show: thick dark outlines round flat fills, gradient
    shading, or flat colour without outlines. Each image independently may get
    a saturation change, flat fills (3×3 blur, then 3-6 levels per channel), a
    linear shading ramp and dark outlines (1 px where the grey level steps down,
    or 2 px across the step). Hues are kept (skin tones and flags differ by
    colour alone); no flips (left and right arrows are different things).
    """
    n, _, h, w = x.shape
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    x = x * s + m

    def uniform(bounds: tuple[float, float]) -> torch.Tensor:
        return (bounds[0] + (bounds[1] - bounds[0]) * torch.rand(n, generator=gen)).view(n, 1, 1, 1).to(x.device)

    def pick(share: float) -> torch.Tensor:
        return (torch.rand(n, generator=gen) < share).view(n, 1, 1, 1).to(x.device)

    grey = x.mean(dim=1, keepdim=True)
    x = (x - grey) * uniform(SATURATION) + grey

    blurred = _blur3(x)
    levels = torch.randint(LEVELS[0], LEVELS[1] + 1, (n,), generator=gen).view(n, 1, 1, 1).to(x) - 1
    x = torch.where(pick(FLATTEN_SHARE), torch.round(blurred.clamp(0, 1) * levels) / levels, x)

    angle = (torch.rand(n, generator=gen) * 2 * math.pi).to(x.device)
    ys = torch.linspace(-1, 1, h, device=x.device).view(1, h, 1)
    xs = torch.linspace(-1, 1, w, device=x.device).view(1, 1, w)
    ramp = 1 + SHADE * (angle.cos().view(n, 1, 1) * xs + angle.sin().view(n, 1, 1) * ys)
    x = torch.where(pick(SHADE_SHARE), x * ramp.unsqueeze(1), x)

    grey = x.mean(dim=1, keepdim=True)
    low = -_max3(-grey)  # the darkest neighbour
    thin = grey - low > 0.3  # 1 px on the bright side of an edge: outside a shape drawn on white
    thick = _max3(grey) - low > 0.3  # both sides of it: 2 px
    line = torch.where(pick(1 / 3), thick, thin)
    x = torch.where(pick(OUTLINE_SHARE) & line, torch.full_like(x, 0.1), x)
    return (x - m) / s


def _split(pairs: list[Pair], fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out a seeded share of the *texts* (with all their pairs) for validation."""
    texts = sorted({p.text for p in pairs})
    if len(texts) < 8:
        raise InputFileError(f"too few distinct texts to train on ({len(texts)}); give at least 8 pairs")
    if not 0 < fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    n_val = max(2, int(round(len(texts) * fraction)))
    held = set(rng.permutation(len(texts))[:n_val].tolist())
    val_texts = {t for i, t in enumerate(texts) if i in held}
    return [p for p in pairs if p.text not in val_texts], [p for p in pairs if p.text in val_texts]


# -- checkpoints -----------------------------------------------------------------


def _save_checkpoint(folder: Path, model: Any, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    for idx, entry in opt_state["state"].items():
        for name, value in entry.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(value).detach().contiguous().cpu()
    save_file(tensors, folder / "state.safetensors.tmp")
    (folder / "state.safetensors.tmp").replace(folder / "state.safetensors")
    (folder / "state.json").write_text(json.dumps({**state, "param_groups": opt_state["param_groups"]}))


def _load_checkpoint(folder: Path, model: Any, opt: torch.optim.Optimizer, expect: dict[str, Any]) -> int:
    """The epoch to resume from (0 when there is no usable checkpoint)."""
    from safetensors.torch import load_file

    try:
        state = json.loads((folder / "state.json").read_text())
        if {k: state.get(k) for k in expect} != expect:
            return 0
        tensors = load_file(folder / "state.safetensors")
    except (OSError, ValueError):
        return 0
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            opt_state["state"].setdefault(int(idx), {})[name] = value
    opt.load_state_dict(opt_state)
    return int(state["epoch"])


# -- the two stages ----------------------------------------------------------------


def _epoch_order(text_of: np.ndarray, gen: torch.Generator, run: int = 2) -> torch.Tensor:
    """The order in which one epoch visits the training pairs (``text_of``: each pair's text).

    Pairs come in runs of ``run`` (two) that share a text (drawings of one
    caption side by side in a batch, for the image-image term of the loss),
    runs shuffled; a text with fewer images makes a shorter run.
    """
    by_text: dict[int, list[int]] = {}
    for k in torch.randperm(len(text_of), generator=gen).tolist():
        by_text.setdefault(int(text_of[k]), []).append(k)
    runs = [ks[s:s + run] for ks in by_text.values() for s in range(0, len(ks), run)]
    return torch.tensor([k for r in torch.randperm(len(runs), generator=gen).tolist() for k in runs[r]],
                        dtype=torch.long)


#: Weight of the image-image term: two images of one text in a batch are each other's right answer.
IMAGE_LOSS_WEIGHT = 1.0


def _contrastive_loss(
    img_f: torch.Tensor, txt_f: torch.Tensor, scale: torch.Tensor, image_ids: torch.Tensor, text_ids: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of pairs, plus an image-image term.

    Pairs that share a text or an image are all right answers, both ways. The
    image-image term asks each image to pick out the batch's other images of its
    text (another artist's drawing of the same thing) from the rest, so that
    the image tower learns what stays the same across drawing styles.
    """
    logits = scale * img_f @ txt_f.T
    same_text = text_ids[:, None] == text_ids[None, :]
    right = (same_text | (image_ids[:, None] == image_ids[None, :])).float()
    target = right / right.sum(1, keepdim=True)  # ``right`` is symmetric: one target for both directions
    loss = 0.5 * (-(target * F.log_softmax(logits, dim=1)).sum(1).mean()
                  - (target * F.log_softmax(logits.T, dim=1)).sum(1).mean())
    eye = torch.eye(len(text_ids), dtype=torch.bool, device=img_f.device)
    others = same_text & ~eye & (image_ids[:, None] != image_ids[None, :])
    rows = others.any(1)
    if rows.any():
        ii = (scale * img_f @ img_f.T).masked_fill(eye, -1e4)[rows]
        t = others[rows].float()
        loss = loss + IMAGE_LOSS_WEIGHT * -(t / t.sum(1, keepdim=True) * F.log_softmax(ii, dim=1)).sum(1).mean()
    return loss


def _text_features(model: Any, tokens: torch.Tensor, text_ids: torch.Tensor, device: str) -> torch.Tensor:
    """Normalised features of the texts ``text_ids`` (rows of ``tokens``), one row per id, repeats included.

    Each distinct text goes through the tower once (a batch's runs of two
    pairs share one): the same features and gradients as a pass over every
    copy, for about half the work.
    """
    distinct, copies = torch.unique(text_ids, return_inverse=True)
    return F.normalize(encode_text_tokens(model, tokens[distinct].to(device)), dim=-1)[copies.to(device)]


def _train_dual(
    model: Any, pixels: torch.Tensor, tokens: torch.Tensor, image_of: np.ndarray, text_of: np.ndarray,
    opts: TrainOptions, lr: float, progress: bool, say: Callable[[str], None],
) -> int:
    from tqdm import tqdm

    coca = is_coca(model)
    cfg = model.visual.preprocess_cfg
    restyle = (list(cfg["mean"]), list(cfg["std"])) if opts.augment == "style" else None
    n = len(image_of)
    batch = min(opts.batch_size, n)
    steps = max(1, n // batch)
    total = steps * opts.epochs
    layout = _conv_layout(model)
    model.visual.to(memory_format=layout)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6, **_adamw_kernel(opts.device),
    )
    warmup = max(1, min(100, total // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))
    )
    expect = {"pairs": str(opts.pairs.resolve()), "base": opts.base, "seed": opts.seed, "epochs": opts.epochs,
              "batch_size": batch, "lr": lr, "val_fraction": opts.val_fraction, "augment": opts.augment}
    ckpt = opts.out / CHECKPOINT
    start = _load_checkpoint(ckpt, model, opt, expect)
    _match_layouts(opt)
    if start:
        say(f"resuming from the checkpoint after epoch {start}/{opts.epochs}")
        # fast-forwarding the schedule steps it before any optimiser step, which torch
        # warns about; front ends silence that once (mmsearch.runtime.quiet_library_warnings)
        for _ in range(start * steps):
            sched.step()
    image_t = torch.from_numpy(image_of)
    text_t = torch.from_numpy(text_of)
    bar = tqdm(total=total, initial=start * steps, unit="step", disable=not progress, file=sys.stderr,
               dynamic_ncols=True, desc="dual encoder")
    try:
        for epoch in range(start, opts.epochs):
            model.train()
            gen = torch.Generator().manual_seed(opts.seed * 100003 + epoch)
            perm = _epoch_order(text_of, gen)
            for step in range(steps):
                idx = perm[step * batch:(step + 1) * batch]
                imgs = _augment(pixels[image_t[idx]], gen)
                if restyle is not None:
                    imgs = _restyle(imgs, gen, *restyle)
                imgs = imgs.to(opts.device).contiguous(memory_format=layout)
                caption_loss = None
                if coca:  # one image pass for the contrastive vector and the decoder's tokens
                    pooled, image_tokens = image_token_states(model, imgs)
                    img_f = F.normalize(pooled, dim=-1)
                    states, cut = coca_text_states(model, tokens[text_t[idx]].to(opts.device))
                    real = (cut[:, 1:] != 0).sum().clamp(min=1)
                    caption_loss = -caption_log_likelihood(model, image_tokens, states, cut).sum() / real
                else:
                    img_f = F.normalize(model.encode_image(imgs), dim=-1)
                txt_f = _text_features(model, tokens, text_t[idx], opts.device)
                scale = model.logit_scale.exp().clamp(max=100)
                loss = _contrastive_loss(img_f, txt_f, scale, image_t[idx].to(img_f.device), text_t[idx].to(img_f.device))
                if caption_loss is not None:
                    loss = loss + CAPTION_LOSS_WEIGHT * caption_loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            _save_checkpoint(ckpt, model, opt, {**expect, "epoch": epoch + 1})
    finally:
        bar.close()
        model.visual.to(memory_format=torch.contiguous_format)
    model.eval()
    return start


def _adamw_kernel(device: str) -> dict[str, bool]:
    """AdamW's fused kernel where torch has one (several times faster than the per-tensor loop)."""
    return {"fused": True} if torch.device(device).type in ("cpu", "cuda") else {"foreach": True}


def _conv_layout(model: Any) -> torch.memory_format:
    """The memory layout the image tower trains in: channels-last for a convolutional tower.

    oneDNN's convolutions (and cuDNN's) run fastest on channels-last tensors;
    a ViT's only convolution is its patch stem, so it keeps the usual layout.
    """
    from open_clip.modified_resnet import ModifiedResNet

    return torch.channels_last if isinstance(model.visual, ModifiedResNet) else torch.contiguous_format


def _match_layouts(opt: torch.optim.Optimizer) -> None:
    """Give each optimiser state tensor its parameter's memory layout.

    A state loaded from a checkpoint is contiguous while a channels-last
    parameter is not, and the fused AdamW kernel reads both as flat memory:
    left as they are, a resumed run would update the wrong elements.
    """
    for param_group in opt.param_groups:
        for param in param_group["params"]:
            for name, value in opt.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    opt.state[param][name] = torch.empty_like(param).copy_(value)


@torch.inference_mode()
def _frozen_states(model: Any, tokenizer: Any, pixels: torch.Tensor, texts: list[str], device: str) -> dict[str, Any]:
    """Normalised vectors and token states of images and texts under the trained encoder."""
    vecs, toks = [], []
    for s in range(0, len(pixels), 256):
        pooled, tokens = image_token_states(model, pixels[s:s + 256].to(device))
        vecs.append(F.normalize(pooled.float(), dim=-1).cpu())
        toks.append(tokens.float().cpu())
    text_vecs = []
    for s in range(0, len(texts), 256):
        text_vecs.append(F.normalize(encode_text_tokens(model, tokenizer(texts[s:s + 256]).to(device)).float(), dim=-1).cpu())
    states, mask = text_states_padded(model, tokenizer, texts, device)
    return {"img": torch.cat(vecs), "tok": torch.cat(toks), "txt": torch.cat(text_vecs), "states": states, "mask": mask}


def _val_recalls(frozen: dict[str, Any], positives: np.ndarray, scorer: Any, k: int) -> dict[str, dict[str, float]]:
    sims = (frozen["txt"] @ frozen["img"].T).numpy()
    t2i_c = i2t_c = None
    if scorer is not None:
        scorer.eval()
        t2i_c = scorer_corrections(scorer, frozen["states"], frozen["mask"], frozen["tok"], text_queries=True)
        i2t_c = scorer_corrections(scorer, frozen["states"], frozen["mask"], frozen["tok"], text_queries=False)
    return {
        "text_to_image": recalls(positive_ranks(sims, positives, t2i_c, k)),
        "image_to_text": recalls(positive_ranks(np.ascontiguousarray(sims.T), np.ascontiguousarray(positives.T), i2t_c, k)),
    }


def _train_reranker(
    frozen: dict[str, Any], positives: np.ndarray, scale: float, opts: TrainOptions, progress: bool
) -> CrossAttentionScorer:
    """Learn the correction on the dual encoder's own hard negatives, both directions."""
    from tqdm import tqdm

    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    dim = frozen["tok"].shape[-1]
    scorer = CrossAttentionScorer(dim).to(opts.device)
    opt = torch.optim.AdamW(scorer.parameters(), lr=1e-3, weight_decay=0.01)
    sims = (frozen["txt"] @ frozen["img"].T).numpy()

    def mine(scores: np.ndarray, pos: np.ndarray) -> list[np.ndarray]:
        k = min(opts.mine_k, scores.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [row[~pos[q, row]] for q, row in enumerate(top)]

    directions = [  # (scores, positives, hard negatives, queries are texts)
        (sims, positives, mine(sims, positives), True),
        (sims.T, positives.T, mine(sims.T, positives.T), False),
    ]
    qb = 32
    batches_per_epoch = sum(math.ceil(len(d[0]) / qb) for d in directions)
    bar = tqdm(total=batches_per_epoch * opts.rerank_epochs, unit="step", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, desc="re-ranker")
    try:
        for _ in range(opts.rerank_epochs):
            plan = []
            for d, (scores, _, _, _) in enumerate(directions):
                order = rng.permutation(len(scores))
                plan += [(d, order[s:s + qb]) for s in range(0, len(order), qb)]
            rng.shuffle(plan)
            scorer.train()
            for d, queries in plan:
                scores, pos, hard, text_queries = directions[d]
                cands = np.empty((len(queries), 1 + opts.negatives), dtype=np.int64)
                for r, q in enumerate(queries):
                    cands[r, 0] = rng.choice(np.flatnonzero(pos[q]))
                    pool = hard[q] if len(hard[q]) else np.flatnonzero(~pos[q])
                    cands[r, 1:] = rng.choice(pool, opts.negatives, replace=len(pool) < opts.negatives)
                q_rep = np.repeat(queries, cands.shape[1])
                c_flat = cands.reshape(-1)
                t_idx, i_idx = (q_rep, c_flat) if text_queries else (c_flat, q_rep)
                t_idx, i_idx = torch.from_numpy(t_idx), torch.from_numpy(i_idx)
                corr = scorer(
                    frozen["states"][t_idx].to(opts.device), frozen["mask"][t_idx].to(opts.device),
                    frozen["tok"][i_idx].to(opts.device),
                ).view(cands.shape)
                dual = torch.from_numpy(np.take_along_axis(scores[queries], cands, axis=1)).to(corr.device)
                # with dual_dropout, some queries see no dual score: the correction must tell pairs apart alone
                keep = torch.from_numpy(rng.random((len(queries), 1)) >= opts.dual_dropout).to(corr.device).float()
                logits = scale * (keep * dual + corr)
                loss = F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long, device=corr.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    finally:
        bar.close()
    return scorer.eval()


# -- a CoCa model: fit the fusion of its decoder's log-likelihood -------------------


@torch.inference_mode()
def _coca_frozen(model: Any, tokenizer: Any, pixels: torch.Tensor, texts: list[str], device: str) -> dict[str, Any]:
    """Normalised vectors of images and texts, and the images' decoder tokens."""
    vecs, toks = [], []
    for s in range(0, len(pixels), 64):
        pooled, tokens = image_token_states(model, pixels[s:s + 64].to(device))
        vecs.append(F.normalize(pooled.float(), dim=-1).cpu())
        toks.append(tokens.float().cpu())
    txt = [F.normalize(encode_text_tokens(model, tokenizer(texts[s:s + 256]).to(device)).float(), dim=-1).cpu()
           for s in range(0, len(texts), 256)]
    return {"img": torch.cat(vecs), "tok": torch.cat(toks), "txt": torch.cat(txt)}


def _direction(sims: np.ndarray, positives: np.ndarray, direction: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positives) with queries as rows, for one direction."""
    if direction == "text_to_image":
        return sims, positives
    return np.ascontiguousarray(sims.T), np.ascontiguousarray(positives.T)


def best_fusion_weight(
    dual: np.ndarray, loglik: np.ndarray, hit: np.ndarray, scale: float, grid: tuple[float, ...] = CAPTION_WEIGHTS
) -> float:
    """The weight of ``grid`` whose fused top candidate is right most often (the smallest on ties).

    ``dual``, ``loglik`` and ``hit`` are (queries, K): each query's top K
    candidates by dual score, their log-likelihoods and whether each is right.
    """
    best, best_hits = 0.0, -1
    rows = np.arange(len(dual))
    for weight in sorted(grid):
        top = np.argmax(dual + weight * loglik / scale, axis=1)
        hits = int(hit[rows, top].sum())
        if hits > best_hits:
            best, best_hits = weight, hits
    return best


def _fit_caption_fusion(
    model: Any, tokenizer: Any, preprocess: Callable, opts: TrainOptions,
    train_set: tuple[torch.Tensor, list[str], np.ndarray], val_set: tuple[torch.Tensor, list[str], np.ndarray],
) -> TrainReport:
    """Fit a CoCa model's fusion weight per direction on training queries; keep it only if validation agrees.

    A direction whose fitted fusion lowers validation Recall@1 gets weight 0
    (the dual encoder alone); the weights are written as ``reranker.json``.
    """
    from mmsearch.encode import Encoder
    from mmsearch.modelspec import ModelSpec

    encoder = Encoder(ModelSpec("local-dir", path=opts.out.resolve()), model, preprocess, tokenizer, opts.device)
    reranker = CaptionReranker(encoder, {d: 0.0 for d in DIRECTIONS})
    rng = np.random.default_rng(opts.seed)
    pixels, texts, positives = train_set
    frozen = _coca_frozen(model, tokenizer, pixels, texts, opts.device)
    sims = (frozen["txt"] @ frozen["img"].T).numpy()
    weights = {}
    for d in DIRECTIONS:
        scores, pos = _direction(sims, positives, d)
        queries = np.flatnonzero(pos.any(axis=1))
        queries = np.sort(rng.permutation(queries)[: opts.fit_queries])
        k = min(opts.mine_k, scores.shape[1])
        top = np.argsort(-scores[queries], axis=1, kind="stable")[:, :k]
        table = reranker.log_likelihood_table(texts, frozen["tok"], d == "text_to_image")
        weights[d] = best_fusion_weight(
            np.take_along_axis(scores[queries], top, axis=1), table(queries, top),
            np.take_along_axis(pos[queries], top, axis=1), reranker.scale,
        )

    va_pixels, va_texts, va_pos = val_set
    val = _coca_frozen(model, tokenizer, va_pixels, va_texts, opts.device)
    va_sims = (val["txt"] @ val["img"].T).numpy()
    reranker.weights = weights
    val_dual, val_rerank = {}, {}
    for d in DIRECTIONS:
        scores, pos = _direction(va_sims, va_pos, d)
        has = pos.any(axis=1)
        table = reranker.log_likelihood_table(va_texts, val["tok"], d == "text_to_image")
        val_dual[d] = recalls(positive_ranks(scores, pos, None, opts.mine_k)[has])
        val_rerank[d] = recalls(positive_ranks(scores, pos, reranker.corrections(table, d), opts.mine_k)[has])
    refused = [d for d in DIRECTIONS if val_rerank[d]["R@1"] < val_dual[d]["R@1"]]
    kept = {d: (0.0 if d in refused else weights[d]) for d in DIRECTIONS}
    save_caption_weights(opts.out, kept, {"fitted": weights, "trained_on": str(opts.pairs), "rerank_k": opts.mine_k})
    fitted = ", ".join(f"{d.replace('_to_', '→')} {weights[d]:g}" for d in DIRECTIONS)
    message = f"CoCa fusion weights fitted ({fitted})"
    if refused:
        message += "; set to 0 (dual encoder alone) where they lowered validation Recall@1: " + ", ".join(refused)
    return TrainReport(
        out=str(opts.out), train_pairs=0, val_pairs=0, epochs=opts.epochs, resumed_from_epoch=0, seconds=0.0,
        val_dual=val_dual, val_rerank=val_rerank, reranker_saved=any(kept.values()),
        reranker_directions=[d for d in DIRECTIONS if kept[d]], message=message,
    )


def accept_reranker(dual: dict[str, dict[str, float]], rerank: dict[str, dict[str, float]]) -> list[str]:
    """The directions a re-ranker is kept for: those whose validation R@1 it does not lower."""
    return [d for d in DIRECTIONS if rerank[d]["R@1"] >= dual[d]["R@1"]]


def _positives(images: list[Path], texts: list[str], links: list[tuple[int, int]]) -> np.ndarray:
    pos = np.zeros((len(texts), len(images)), dtype=bool)
    for i, j in links:
        pos[j, i] = True
    return pos


def train(opts: TrainOptions, *, progress: bool = True, say: Callable[[str], None] = print) -> TrainReport:
    """Train a dual encoder and a re-ranker on ``opts.pairs``; write a model folder to ``opts.out``."""
    from safetensors.torch import save_file

    started = time.perf_counter()
    scratch = opts.base == "small"
    opts = replace(opts, epochs=opts.epochs if opts.epochs is not None else SMALL_EPOCHS if scratch else BASE_EPOCHS,
                   augment=opts.augment or ("style" if scratch else "shift"))
    if opts.augment not in AUGMENTS:
        raise UsageError(f"--augment must be one of {', '.join(AUGMENTS)}, got {opts.augment!r}")
    if opts.epochs < 0 or (opts.epochs == 0 and opts.base == "small") or opts.rerank_epochs < 0:
        raise UsageError("--epochs must be at least 1 (0 only with a --base, to fit its re-ranker alone)")
    if opts.batch_size is not None and opts.batch_size < 2:
        raise UsageError(f"--train-batch must be at least 2 for contrastive training, got {opts.batch_size}")
    torch.manual_seed(opts.seed)
    pairs = read_pairs(opts.pairs)
    train_pairs, val_pairs = _split(pairs, opts.val_fraction, opts.seed)
    opts = replace(opts, batch_size=opts.batch_size or default_batch(scratch, len(train_pairs)))
    opts.out.mkdir(parents=True, exist_ok=True)

    model, tokenizer, model_cfg, preprocess_cfg, preprocess = _base_model(opts.base, opts.device)
    size = preprocess_cfg["size"]
    size = int(max(size) if isinstance(size, list) else size)
    lr = opts.lr if opts.lr is not None else default_lr(scratch, opts.batch_size)

    tr_images, tr_texts, tr_links = group(train_pairs)
    pixels = _load_pixels(tr_images, preprocess, size)
    tokens = tokenizer(tr_texts)
    image_of = np.array([i for i, _ in tr_links], dtype=np.int64)
    text_of = np.array([j for _, j in tr_links], dtype=np.int64)
    resumed = _train_dual(model, pixels, tokens, image_of, text_of, opts, lr, progress, say)

    # the dual encoder is final: write it first, so it is kept whatever the re-ranker does
    (opts.out / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, indent=2)
    )
    weights = opts.out / "open_clip_model.safetensors"
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(weights) + ".tmp")
    Path(str(weights) + ".tmp").replace(weights)
    for name in ("reranker.safetensors", "reranker.json", EXEMPLAR_WEIGHTS, EXEMPLAR_CONFIG):
        (opts.out / name).unlink(missing_ok=True)

    va_images, va_texts, va_links = group(val_pairs)
    if is_coca(model):
        report = _fit_caption_fusion(
            model, tokenizer, preprocess, opts,
            (pixels, tr_texts, _positives(tr_images, tr_texts, tr_links)),
            (_load_pixels(va_images, preprocess, size), va_texts, _positives(va_images, va_texts, va_links)),
        )
        report.train_pairs, report.val_pairs, report.resumed_from_epoch = len(train_pairs), len(val_pairs), resumed
        return _finish(report, opts, started)

    frozen = _frozen_states(model, tokenizer, pixels, tr_texts, opts.device)
    scale = float(model.logit_scale.exp().item())
    scorer = _train_reranker(frozen, _positives(tr_images, tr_texts, tr_links), scale, opts, progress)

    val_frozen = _frozen_states(model, tokenizer, _load_pixels(va_images, preprocess, size), va_texts, opts.device)
    val_pos = _positives(va_images, va_texts, va_links)
    report = TrainReport(
        out=str(opts.out), train_pairs=len(train_pairs), val_pairs=len(val_pairs), epochs=opts.epochs,
        resumed_from_epoch=resumed, seconds=0.0,
        val_dual=_val_recalls(val_frozen, val_pos, None, opts.mine_k),
        val_rerank=_val_recalls(val_frozen, val_pos, scorer, opts.mine_k),
    )
    kept = accept_reranker(report.val_dual, report.val_rerank)
    change = ", ".join(f"{ARROWS[d]} {report.val_dual[d]['R@1']:.3f} → {report.val_rerank[d]['R@1']:.3f}"
                       for d in DIRECTIONS)
    report.reranker_directions = kept
    report.exemplar_weights = _fit_exemplars(report, val_frozen, va_texts, va_links, val_pos, scorer, kept, opts)
    # the memory holds every pair of the file: the validation pairs are the user's too
    memory = ExemplarMemory.build(
        tr_texts + va_texts, torch.cat([frozen["img"], val_frozen["img"]]).numpy(),
        list(tr_links) + [(i + len(tr_images), j + len(tr_texts)) for i, j in va_links],
    )
    memory.weights, memory.offset = dict(report.exemplar_weights), report.exemplar_offset
    if kept:
        report.message = (f"re-ranker saved (validation Recall@1 {change})" if len(kept) == len(DIRECTIONS) else
                          f"re-ranker saved for {ARROWS[kept[0]]} only: it lowered validation Recall@1 the other way "
                          f"({change}); the other direction keeps the dual-encoder ranking")
    elif memory.active:
        report.message = f"cross-attention re-ranker not used: it lowered validation Recall@1 ({change})"
    else:
        report.message = (f"re-ranker NOT saved: it lowered validation Recall@1 ({change}); "
                          "the dual encoder alone was saved")
    if kept or memory.active:
        save_scorer(scorer, opts.out, {"trained_on": str(opts.pairs), "rerank_k": opts.mine_k, "directions": kept})
        report.reranker_saved = True
    if memory.active:
        memory.save(opts.out, {"trained_on": str(opts.pairs)})
        used = ", ".join(f"{ARROWS[d]} weight {memory.weights[d]:g}" for d in DIRECTIONS if memory.weights[d] > 0)
        after = ", ".join(f"{ARROWS[d]} {report.val_dual[d]['R@1']:.3f} → {report.val_saved[d]['R@1']:.3f}"
                          for d in DIRECTIONS)
        report.message += f"; exemplar memory of {len(memory.captions)} captions saved ({used}; validation Recall@1 {after})"
    return _finish(report, opts, started)


def _fit_exemplars(
    report: TrainReport, val_frozen: dict[str, Any], va_texts: list[str], va_links: list[tuple[int, int]],
    val_pos: np.ndarray, scorer: Any, kept: list[str], opts: TrainOptions,
) -> dict[str, float]:
    """The exemplar weights per direction, fitted on the validation split (leave one picture out).

    Added on top of the cross-attention corrections of the directions where
    that re-ranker is kept, as search adds them. Also fills ``report.val_saved``
    (the validation recalls of everything that is saved).
    """
    images = val_frozen["img"].numpy()
    sims = (val_frozen["txt"] @ val_frozen["img"].T).numpy()
    table = leave_one_out_table(va_texts, images, va_links)
    base = {d: (scorer_corrections(scorer, val_frozen["states"], val_frozen["mask"], val_frozen["tok"],
                                   text_queries=d == "text_to_image") if d in kept else None) for d in DIRECTIONS}

    def ranks(direction: str, extra: Any) -> np.ndarray:
        if direction == "text_to_image":  # as search applies it: to every image (see evaluate.everywhere)
            return positive_ranks(everywhere(sims, extra), val_pos, base[direction], opts.mine_k)
        corrections = combined(base[direction], extra)
        # as search does: the texts the memory lifts most are re-ranked too (evaluate.memory_text_candidates)
        lifted = None if extra is None else (lambda image: np.argsort(-table[:, image], kind="stable")[:opts.mine_k])
        return positive_ranks(np.ascontiguousarray(sims.T), np.ascontiguousarray(val_pos.T), corrections, opts.mine_k,
                              extra=lifted)

    report.exemplar_offset = unrelated_mean(table, va_links)
    table = np.where(table != 0, table - report.exemplar_offset, 0).astype(np.float32)  # as search will see it
    weights, _ = fit_weights(table, lambda d, extra: recalls(ranks(d, extra))["R@1"])
    report.val_saved = {
        d: recalls(ranks(d, weighted_corrections(table, weights[d], d == "text_to_image"))) for d in DIRECTIONS
    }
    return weights


def _finish(report: TrainReport, opts: TrainOptions, started: float) -> TrainReport:
    """Time the run and write its report next to the model (``mmsearch_model.json``)."""
    report.seconds = time.perf_counter() - started
    info = {"base": opts.base, "pairs": str(opts.pairs), "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
            **report.as_dict()}
    (opts.out / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False))
    return report
