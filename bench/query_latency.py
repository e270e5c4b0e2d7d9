"""Search latency at 10k / 100k / 1M vectors: exact (flat) vs the ANN index mmsearch picks.

For each size: index build time, p50/p95 latency of one k=10 query (warm) for
image queries and for text-like queries, the same with a short text query
encoded first (ViT-B-32-sized text tower, random weights), and recall@10 of
each ANN index against exact search.

Vectors are synthetic but shaped like CLIP ViT-B-32 embeddings (see
``_common.clip_like_vectors``, whose measured properties are printed): a
narrow cone, a power-law spectrum, heavy-tailed diffuse topics, near-duplicate
bursts, and text queries across a modality gap, whose neighbours spread over
IVF cells built from images. Uniform noise, or tight clusters, would make
every nprobe look the same.

All indexes of one size are held at once and timed in alternating rounds, so
a noisy machine slows them alike: compare rows of one run, not absolute times.

    python bench/query_latency.py                              # 10k, 100k, 1M (~6 min)
    python bench/query_latency.py --sizes 10000,100000         # quick
    python bench/query_latency.py --sizes 1000000 --ann ivf,ivf-flat --sweep --rss
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import (ROOT, Timer, clip_like_vectors, embedding_stats, machine, peak_rss_mib, percentiles, table,
                     vit_b32_dir)

from mmsearch.index import INDEX_TYPES, TRAIN_PER_CELL, VectorIndex, choose_index_type, new_faiss_index

TEXTS = ["a dog on a beach", "red car", "sunset over the mountains", "birthday cake with candles",
         "a cat sleeping on a sofa", "snowy street at night", "two people hiking", "bowl of ramen"]
HEADERS = ["vectors", "index", "build s", "image p50", "image p95", "text p50", "text p95", "p50 +encode",
           "recall img", "recall text", "chosen"]


def build(kind: str, vectors: np.ndarray) -> tuple[VectorIndex, float]:
    dim = vectors.shape[1]
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
    with Timer() as t:
        index = VectorIndex("image", dim, "bench", kind, new_faiss_index(dim, kind, len(vectors)))
        if not index.trained:  # the same sampling build_from_catalog does
            size = min(len(vectors), TRAIN_PER_CELL * int(index.faiss_index.nlist))
            sample = np.sort(np.random.default_rng(0).choice(len(vectors), size, replace=False))
            index.train(vectors[sample])
        for start in range(0, len(vectors), 20000):
            index.add(ids[start:start + 20000], vectors[start:start + 20000])
    return index, t.seconds


def timed(index: VectorIndex, queries: np.ndarray, k: int = 10) -> tuple[list[float], np.ndarray]:
    times, found = [], []
    for q in queries:
        t0 = time.perf_counter()
        _, ids = index.search(q, k)
        times.append(time.perf_counter() - t0)
        found.append(ids[0])
    return times, np.stack(found)


def with_text(index: VectorIndex, encoder, n: int, k: int = 10) -> list[float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        v = encoder.embed_texts([TEXTS[i % len(TEXTS)]])[0]
        index.search(v, k)
        times.append(time.perf_counter() - t0)
    return times


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def label(index: VectorIndex) -> str:
    if index.index_type == "flat":
        return "flat (exact)"
    return f"{index.index_type} {index.faiss_index.nlist}/{index.faiss_index.nprobe}"


def cell_spread(index: VectorIndex, queries: np.ndarray, truth: np.ndarray, vectors: np.ndarray) -> float:
    """Share of a query's true top-10 that lie in the query's nearest cell (1.0: one cell holds them all)."""
    quantizer = index.faiss_index.quantizer
    _, cell = quantizer.search(queries, 1)
    shares = [(quantizer.assign(vectors[t - 1], 1) == c[0]).mean() for t, c in zip(truth, cell)]
    return float(np.mean(shares))


def rss_child(index_file: str, model_dir: str, load_index: bool) -> None:
    """Run in a fresh process: load the model (and the saved index), search, print peak RSS."""
    from mmsearch.encode import load_encoder

    encoder = load_encoder(f"local-dir:{model_dir}", "cpu")
    if load_index:
        index = VectorIndex.load(Path(index_file))
        for text in TEXTS * 5:
            index.search(encoder.embed_texts([text])[0], 10)
    else:
        encoder.embed_texts(TEXTS)
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--queries", type=int, default=200, help="queries of each kind (image, text-like)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds over the indexes of a size")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--ann", default="ivf", help=f"ANN index types to time, comma-separated, of {INDEX_TYPES[1:]}")
    ap.add_argument("--no-text", action="store_true", help="skip the text-encoding column (no model load)")
    ap.add_argument("--sweep", action="store_true", help="recall/latency for several nprobe at the largest size")
    ap.add_argument("--rss", action="store_true", help="peak RSS of a search process at the largest size")
    ap.add_argument("--rss-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], args.rss_child[1], args.rss_child[2] == "1")
        return

    print(machine())
    sizes = [int(s) for s in args.sizes.split(",")]
    ann_types = args.ann.split(",")
    encoder = None
    if not args.no_text:
        from mmsearch.encode import load_encoder

        model_dir = vit_b32_dir()
        encoder = load_encoder(f"local-dir:{model_dir}", "cpu")
    rows, key = [], None
    for n in sizes:
        vectors, image_q, text_q = clip_like_vectors(n, args.queries, args.dim, seed=n)
        print(f"\n{n:,} CLIP-like vectors ({args.dim}-d), {args.queries} image + {args.queries} text-like queries: "
              f"{embedding_stats(vectors, text_q)}", flush=True)
        indexes = {}
        for kind in ["flat", *ann_types]:
            indexes[kind] = build(kind, vectors)
        times = {kind: {"image": [], "text": []} for kind in indexes}
        found = {}
        for q in (image_q[:10], text_q[:10]):  # warm up
            for index, _ in indexes.values():
                timed(index, q)
        for r in range(args.rounds):
            for kind, (index, _) in indexes.items():
                if kind == "flat" and r:  # exact search is slow at 1M and only the baseline: one round
                    continue
                for name, q in (("image", image_q), ("text", text_q)):
                    t, f = timed(index, q)
                    times[kind][name] += t
                    found.setdefault((kind, name), f)
        truth = {name: found[("flat", name)] for name in ("image", "text")}
        size_rows = []
        for kind, (index, build_s) in indexes.items():
            i50, i95 = percentiles(times[kind]["image"])
            t50, t95 = percentiles(times[kind]["text"])
            chosen = choose_index_type(n) == kind
            enc = percentiles(with_text(index, encoder, args.queries // 2))[0] if encoder and (chosen or kind == "flat") else None
            rec = [recall(found[(kind, name)], truth[name]) for name in ("image", "text")]
            size_rows.append([f"{n:,}", label(index), f"{build_s:.1f}", f"{i50:.2f}", f"{i95:.2f}", f"{t50:.2f}",
                              f"{t95:.2f}", f"{enc:.1f}" if enc is not None else "", f"{rec[0]:.3f}", f"{rec[1]:.3f}",
                              "*" if chosen else ""])
            if kind == ann_types[0]:
                key = (n, label(index), max(i50, t50), max(i95, t95), min(rec), build_s,
                       percentiles(times["flat"]["text"])[0])
        print(table(HEADERS, size_rows), flush=True)
        rows += size_rows
        ann0 = indexes[ann_types[0]][0]
        sizes_ = np.array([ann0.faiss_index.invlists.list_size(i) for i in range(ann0.faiss_index.nlist)])
        print(f"{label(ann0)}: cells hold {sizes_.mean():.0f} vectors on average, the largest {sizes_.max()}; share of "
              f"a query's true top-10 in its nearest cell: image {cell_spread(ann0, image_q, truth['image'], vectors):.2f}, "
              f"text {cell_spread(ann0, text_q, truth['text'], vectors):.2f}")

        if args.sweep and n == sizes[-1]:
            sweep = []
            for kind in ann_types:
                index = indexes[kind][0]
                default = index.faiss_index.nprobe
                for nprobe in (8, 16, 24, 32, 48, 64, 128):
                    index.faiss_index.nprobe = nprobe
                    out = [kind, f"{index.faiss_index.nlist}/{nprobe}"]
                    for name, q in (("image", image_q), ("text", text_q)):
                        t, f = timed(index, q)
                        out += [*(f"{x:.2f}" for x in percentiles(t)), f"{recall(f, truth[name]):.3f}"]
                    sweep.append(out + ["*" if nprobe == default else ""])
                index.faiss_index.nprobe = default
            print(f"\nnprobe sweep at {n:,} vectors (one round):")
            print(table(["index", "cells/probed", "image p50", "image p95", "recall img", "text p50", "text p95",
                         "recall text", "default"], sweep))
        if args.rss and n == sizes[-1] and encoder is not None:
            ann = indexes[ann_types[0]][0]
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "images.faiss"
                ann.save(path)
                indexes.clear()
                del ann, index, ann0
                gc.collect()
                child = [sys.executable, str(Path(__file__)), "--rss-child", str(path), str(model_dir)]
                model_only = json.loads(subprocess.check_output(child + ["0"], cwd=ROOT).splitlines()[-1])["peak_rss_mib"]
                full = json.loads(subprocess.check_output(child + ["1"], cwd=ROOT).splitlines()[-1])["peak_rss_mib"]
            raw = n * args.dim * 4 / 2**20
            print(f"\npeak RSS, search process at {n:,} vectors ({ann_types[0]}, model + saved index loaded, 40 text "
                  f"queries): {full:.0f} MiB; model alone peaks at {model_only:.0f} MiB; raw float32 vectors {raw:.0f} MiB; "
                  f"budget 1.2 x raw + model = {1.2 * raw + model_only:.0f} MiB -> "
                  f"peak / budget = {full / (1.2 * raw + model_only):.2f}")
        indexes.clear()
        del vectors, image_q, text_q
        gc.collect()

    print("\nall rows:")
    print(table(HEADERS, rows))
    print(f"latency in ms of one k=10 query, warm, {args.rounds} alternating rounds (exact: one); '+encode': p50 with a short "
          "text query encoded first; recall@10 vs exact; '*': the index mmsearch picks at that size")
    n, name, a50, a95, rec, build_s, exact50 = key
    print(f"KEY: {n:,} vectors, {name}: p50 {a50:.2f} ms, p95 {a95:.2f} ms (worse of image/text), recall@10 "
          f">= {rec:.3f}, build {build_s:.0f} s; exact p50 {exact50:.2f} ms (exact/ANN = {exact50 / a50:.1f}x)")


if __name__ == "__main__":
    main()
