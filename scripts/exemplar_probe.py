"""Probe (not shipped): does an exemplar memory of the training pairs re-rank better than the dual encoder?

    python scripts/exemplar_probe.py TRAIN_PAIRS EVAL_PAIRS MODEL_DIR [--device cpu]

MODEL_DIR is a folder written by ``mmsearch train TRAIN_PAIRS``. For each
evaluation text that was a *training* caption, its exemplar is the normalised
mean embedding of its training images; each query's dual-encoder top 50 are
re-scored by ``(1 - a) * cos(text, image) + a * cos(exemplar, image)`` (both
directions; captions never trained on keep the dual score). Prints R@1 both
ways for a = 0 (dual alone), 0.3, 0.5, 0.7, 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mmsearch.encode import load_encoder
from mmsearch.evaluate import positive_ranks
from mmsearch.pairs import group, read_pairs
from mmsearch.train import _load_pixels, _split


def embed(encoder, pairs_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    images, texts, links = group(read_pairs(pairs_path))
    pixels = _load_pixels(images, encoder.preprocess, encoder.image_size)
    img = np.concatenate([encoder.embed_images(pixels[s:s + 512]) for s in range(0, len(pixels), 512)])
    positives = np.zeros((len(texts), len(images)), dtype=bool)
    for i, j in links:
        positives[j, i] = True
    return img, encoder.embed_texts(texts), positives, texts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("train_pairs", type=Path)
    parser.add_argument("eval_pairs", type=Path)
    parser.add_argument("model", type=Path)
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args()
    options = json.loads((a.model / "mmsearch_model.json").read_text())["options"]
    train_pairs, _ = _split(read_pairs(a.train_pairs), float(options["val_fraction"]), int(options["seed"]))
    trained = {p.text for p in train_pairs}
    encoder = load_encoder(f"local-dir:{a.model.resolve()}", a.device)
    tw_img, _, tw_pos, tw_texts = embed(encoder, a.train_pairs)
    img, txt, pos, texts = embed(encoder, a.eval_pairs)
    row_of = {t: j for j, t in enumerate(tw_texts)}
    exemplar = np.zeros_like(txt)
    seen = np.array([t in trained for t in texts])
    for j, t in enumerate(texts):
        if seen[j]:
            v = tw_img[tw_pos[row_of[t]]].mean(0)
            exemplar[j] = v / np.linalg.norm(v)
    dual = txt @ img.T
    memory = exemplar @ img.T
    print(f"{seen.sum()} of {len(texts)} evaluation captions were training captions")
    for mix in (0.0, 0.3, 0.5, 0.7, 1.0):
        final = np.where(seen[:, None], (1 - mix) * dual + mix * memory, dual)

        def corrections(f: np.ndarray, d: np.ndarray):
            return lambda rows, cands: np.take_along_axis(f[rows], cands, 1) - np.take_along_axis(d[rows], cands, 1)

        t2i = positive_ranks(dual, pos, corrections(final, dual))[pos.any(1)]
        i2t = positive_ranks(np.ascontiguousarray(dual.T), np.ascontiguousarray(pos.T), corrections(final.T, dual.T))
        print(f"a={mix:.1f}  text→image R@1 {100 * np.mean(t2i < 1):5.1f}  image→text R@1 {100 * np.mean(i2t < 1):5.1f}")


if __name__ == "__main__":
    main()
