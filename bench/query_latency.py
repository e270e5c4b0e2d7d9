"""Search latency at 10k / 100k / 1M vectors: exact (flat) vs the ANN index mmsearch picks.

For each size: index build time, p50/p95 latency of one k=10 query (warm),
the same with a short text query encoded first (ViT-B-32-sized text tower,
random weights), and recall@10 of the ANN index against exact search.

Vectors are synthetic but shaped like CLIP image embeddings (see
``_common.clustered_vectors``): unit vectors in a narrow cone, grouped in
sqrt(N) clusters of varying spread, with anisotropic noise. Queries (default
``--query-kind text-like``) are held-out vectors mixed with a second one and
shifted by a common offset, so they fall between clusters as text queries do;
that is the hard case for an IVF index.

    python bench/query_latency.py                       # 10k, 100k, 1M (~6 min)
    python bench/query_latency.py --sizes 10000,100000  # quick
    python bench/query_latency.py --sizes 1000000 --sweep --rss
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

from _common import ROOT, Timer, clustered_vectors, machine, peak_rss_mib, percentiles, table, vit_b32_dir

from mmsearch.index import TRAIN_PER_CELL, VectorIndex, choose_index_type, new_faiss_index

TEXTS = ["a dog on a beach", "red car", "sunset over the mountains", "birthday cake with candles",
         "a cat sleeping on a sofa", "snowy street at night", "two people hiking", "bowl of ramen"]


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


def latencies(index: VectorIndex, queries: np.ndarray, k: int = 10) -> tuple[list[float], np.ndarray]:
    for q in queries[:10]:  # warm up
        index.search(q, k)
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
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--query-kind", choices=("text-like", "image"), default="text-like",
                    help="image: held-out vectors of the same clusters (easy for IVF); text-like: a held-out vector "
                         "mixed with a second one from another cluster and shifted by a common offset, like text "
                         "queries that sit apart from image clusters (the modality gap)")
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
    encoder = None
    if not args.no_text:
        from mmsearch.encode import load_encoder

        model_dir = vit_b32_dir()
        encoder = load_encoder(f"local-dir:{model_dir}", "cpu")
    rows, last = [], None
    for n in sizes:
        data = clustered_vectors(n + args.queries, args.dim, clusters=max(8, int(np.sqrt(n))), seed=n)
        vectors, queries = data[:n], data[n:]
        if args.query_kind == "text-like":
            rng = np.random.default_rng(1)
            gap = rng.normal(size=args.dim).astype(np.float32)
            gap *= 0.5 / np.linalg.norm(gap)
            queries = queries + 0.7 * np.roll(queries, 1, axis=0) + gap
            queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
        exact, exact_build = build("flat", vectors)
        t_exact, truth = latencies(exact, queries)
        p50, p95 = percentiles(t_exact)
        row_text = percentiles(with_text(exact, encoder, args.queries // 2)) if encoder else (float("nan"),) * 2
        rows.append([f"{n:,}", "flat (exact)", f"{exact_build:.1f}", f"{p50:.2f}", f"{p95:.2f}",
                     f"{row_text[0]:.2f}", f"{row_text[1]:.2f}", "1.000", "*" if choose_index_type(n) == "flat" else ""])
        del exact
        gc.collect()
        ann, ann_build = build("ivf", vectors)
        t_ann, found = latencies(ann, queries)
        a50, a95 = percentiles(t_ann)
        rec = recall(found, truth)
        ann_text = percentiles(with_text(ann, encoder, args.queries // 2)) if encoder else (float("nan"),) * 2
        nlist, nprobe = ann.faiss_index.nlist, ann.faiss_index.nprobe
        rows.append([f"{n:,}", f"ivf {nlist}/{nprobe}", f"{ann_build:.1f}", f"{a50:.2f}", f"{a95:.2f}",
                     f"{ann_text[0]:.2f}", f"{ann_text[1]:.2f}", f"{rec:.3f}", "*" if choose_index_type(n) == "ivf" else ""])
        print(table(["vectors", "index", "build s", "p50 ms", "p95 ms", "p50 +text", "p95 +text", "recall@10", "chosen"], rows[-2:]),
              flush=True)
        last = (n, a50, a95, rec, ann_build, p50)
        if args.sweep and n == sizes[-1]:
            sweep = []
            for nprobe_try in (8, 16, 32, 64, 128):
                ann.faiss_index.nprobe = nprobe_try
                t, f = latencies(ann, queries)
                s50, s95 = percentiles(t)
                sweep.append([nprobe_try, f"{s50:.2f}", f"{s95:.2f}", f"{recall(f, truth):.3f}"])
            ann.faiss_index.nprobe = nprobe
            print(f"\nnprobe sweep at {n:,} vectors, nlist {nlist}:")
            print(table(["nprobe", "p50 ms", "p95 ms", "recall@10"], sweep))
        if args.rss and n == sizes[-1] and encoder is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "images.faiss"
                ann.save(path)
                del ann
                gc.collect()
                child = [sys.executable, str(Path(__file__)), "--rss-child", str(path), str(model_dir)]
                model_only = json.loads(subprocess.check_output(child + ["0"], cwd=ROOT).splitlines()[-1])["peak_rss_mib"]
                full = json.loads(subprocess.check_output(child + ["1"], cwd=ROOT).splitlines()[-1])["peak_rss_mib"]
            raw = n * args.dim * 4 / 2**20
            print(f"\npeak RSS, search process at {n:,} vectors (model + saved index loaded, 40 text queries): "
                  f"{full:.0f} MiB; model alone peaks at {model_only:.0f} MiB; raw vectors {raw:.0f} MiB; "
                  f"budget 1.2 x raw + model = {1.2 * raw + model_only:.0f} MiB -> "
                  f"peak / budget = {full / (1.2 * raw + model_only):.2f}")
        del data, vectors, queries
        gc.collect()

    print("\nall rows:")
    print(table(["vectors", "index", "build s", "p50 ms", "p95 ms", "p50 +text", "p95 +text", "recall@10", "chosen"], rows))
    print("latency in ms of one k=10 query; '+text' includes encoding a short text query; recall@10 vs exact")
    n, a50, a95, rec, ann_build, p50 = last
    print(f"KEY: {n:,} vectors: ANN p50 {a50:.2f} ms, p95 {a95:.2f} ms, recall@10 {rec:.3f}, build {ann_build:.0f} s; "
          f"exact p50 {p50:.2f} ms (exact/ANN = {p50 / a50:.1f}x)")


if __name__ == "__main__":
    main()
