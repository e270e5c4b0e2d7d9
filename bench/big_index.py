"""The compressed index (``ivfpq``) at 10M vectors of dimension 512, in bounded memory.

Vectors are generated in chunks and never held all at once: CLIP-like
synthetic embeddings (the generator of ``_common.clip_like_vectors`` made
chunkable: a cone, a power-law spectrum, heavy-tailed diffuse topics of ~150
images, near-duplicate bursts, text queries across a modality gap). They are
written as float16 to a source file that plays the catalog's part: the build
reads its training sample and its chunks from there, as ``build_from_catalog``
reads the catalog.

Reported: build time (train / add / save), peak memory of the build, index
bytes on disk (codes + exact vectors), and from a fresh search process that
memory-maps the index: resident memory (besides no model), query p50/p95 of
one k=10 query, and recall@10 against exact search over all vectors, for
held-out image queries and text-like queries, at several ``nprobe``.

    python bench/big_index.py --n 1000000             # ~5 min
    nohup python bench/big_index.py --n 10000000 > /tmp/big.log 2>&1 &   # ~30-40 min, 20 GB of disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import CACHE, Timer, machine, peak_rss_mib, percentiles, table

from mmsearch import bigindex
from mmsearch.bigindex import VectorFile
from mmsearch.index import VectorIndex, new_faiss_index, vectors_path

CHUNK = 100_000


class Generator:
    """CLIP-like unit vectors, chunk by chunk: chunk ``i`` is the same on every call."""

    def __init__(self, n: int, dim: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.seed = dim, seed
        self.basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
        spectrum = (np.arange(1, dim + 1) ** -0.4).astype(np.float32)
        self.spectrum = spectrum / np.sqrt((spectrum ** 2).sum())
        n_topics = max(16, n // 150)
        supers = self.semantic(rng, max(4, int(np.sqrt(n_topics))))
        self.topics = (0.75 * supers[rng.integers(0, len(supers), n_topics)]
                       + 0.66 * self.semantic(rng, n_topics)).astype(np.float32)
        weights = rng.lognormal(0, 1.3, n_topics)
        self.weights = weights / weights.sum()
        self.spread = rng.uniform(0.8, 1.4, n_topics).astype(np.float32)
        mean = rng.standard_normal(dim).astype(np.float32)
        self.image_mean = mean / np.linalg.norm(mean)
        gap = rng.standard_normal(dim).astype(np.float32)
        gap -= (gap @ self.image_mean) * self.image_mean
        self.text_mean = 0.3 * self.image_mean + 0.95 * gap / np.linalg.norm(gap)

    def semantic(self, rng: np.random.Generator, m: int) -> np.ndarray:
        return (rng.standard_normal((m, self.dim), dtype=np.float32) * self.spectrum) @ self.basis.T

    def images(self, chunk: int, m: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, chunk))
        topic = rng.choice(len(self.topics), m, p=self.weights)
        out = self.topics[topic] + self.semantic(rng, m) * self.spread[topic, None]
        dup = rng.random(m) < 0.10  # near-duplicates of another image of the chunk
        source = rng.integers(0, m, int(dup.sum()))
        out[dup] = out[source] + 0.25 * self.spread[topic[source], None] * self.semantic(rng, int(dup.sum()))
        out += 0.85 * self.image_mean * np.linalg.norm(out, axis=1, keepdims=True)
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)

    def texts(self, m: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, 2 * 10**6))  # a stream no image chunk uses
        concept = self.topics[rng.choice(len(self.topics), m, p=self.weights)] + 0.6 * self.semantic(rng, m)
        mixed = rng.random(m) < 0.4
        concept[mixed] += 0.6 * self.topics[rng.choice(len(self.topics), int(mixed.sum()), p=self.weights)]
        concept /= np.linalg.norm(concept, axis=1, keepdims=True)
        text_only = rng.standard_normal((m, self.dim)).astype(np.float32)
        text_only /= np.linalg.norm(text_only, axis=1, keepdims=True)
        out = self.text_mean + 0.45 * concept + 0.55 * text_only
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def generate(path: Path, gen: Generator, n: int) -> VectorFile:
    """The source vectors, ids 1..n, as float16 rows (row 0 unused, as catalog ids start at 1)."""
    source = VectorFile(path, gen.dim, writable=True)
    path.write_bytes(b"")
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        source.write(np.arange(start + 1, start + m + 1), gen.images(start // CHUNK, m))
    source.commit(path)
    return source


def build(source: VectorFile, n: int, path: Path) -> tuple[VectorIndex, dict[str, float]]:
    dim = source.dim
    times = {}
    index = VectorIndex("image", dim, "bench", "ivfpq", new_faiss_index(dim, "ivfpq", n))
    index.vectors = VectorFile.create(vectors_path(path), dim)
    with Timer() as t:
        size = bigindex.train_size(n, dim)
        sample = np.sort(np.random.default_rng(0).choice(np.arange(1, n + 1), size, replace=False))
        index.train(source.read(sample))
    times["train s"] = t.seconds
    with Timer() as t:
        for start in range(1, n + 1, CHUNK):
            ids = np.arange(start, min(n + 1, start + CHUNK))
            index.add(ids, source.read(ids))
    times["add s"] = t.seconds
    with Timer() as t:
        index.save(path)
    times["save s"] = t.seconds
    return index, times


def exact_top(source: VectorFile, n: int, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k ids over all source vectors, chunk by chunk."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for start in range(1, n + 1, CHUNK):
        ids = np.arange(start, min(n + 1, start + CHUNK))
        s = queries @ source.read(ids).T
        all_s = np.concatenate([best_s, s], axis=1)
        all_i = np.concatenate([best_i, np.broadcast_to(ids, s.shape)], axis=1)
        top = np.argpartition(-all_s, k, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(all_s, top, 1), np.take_along_axis(all_i, top, 1)
    return best_i


def rss() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[key] = int(line.split()[1]) / 1024
    return out


def search_process(args: argparse.Namespace) -> None:
    """Run in a fresh process: map the index, time queries, measure memory and recall."""
    folder = Path(args.dir)
    before = rss()
    index = VectorIndex.load(folder / "images.faiss")
    loaded = rss()
    data = np.load(folder / "queries.npz")
    rows, sweep = [], [int(x) for x in args.nprobe.split(",")] if args.nprobe else [int(index.ivf.nprobe)]
    factors = [int(x) for x in args.factors.split(",")]
    default_probe, default_factor = int(index.ivf.nprobe), bigindex.REFINE_FACTOR
    for nprobe in sweep:
        for factor in factors:
            index.ivf.nprobe = nprobe
            bigindex.set_quantizer_ef(index.ivf)
            bigindex.REFINE_FACTOR = factor
            row = [f"{nprobe}/{int(index.ivf.nlist)}", factor]
            for kind in ("image", "text"):
                queries, truth = data[f"{kind}_q"], data[f"{kind}_gt"]
                for q in queries[:10]:
                    index.search(q, 10)  # warm the code path
                times, found = [], []
                for q in queries:
                    t0 = time.perf_counter()
                    _, ids = index.search(q, 10)
                    times.append(time.perf_counter() - t0)
                    found.append(ids[0])
                p50, p95 = percentiles(times)
                recall = np.mean([len(set(f.tolist()) & set(t.tolist())) / 10 for f, t in zip(found, truth)])
                row += [f"{p50:.2f}", f"{p95:.2f}", f"{recall:.3f}"]
            row.append("*" if (nprobe, factor) == (default_probe, default_factor) else "")
            rows.append(row)
    after = rss()
    print(table(["nprobe", "refine", "img p50 ms", "img p95 ms", "img R@10", "txt p50 ms", "txt p95 ms",
                 "txt R@10", "default"], rows))
    print(f"search process memory, MiB: before load {before['VmRSS']:.0f}; after load {loaded['VmRSS']:.0f}; "
          f"after all queries {after['VmRSS']:.0f} (anonymous {after['RssAnon']:.0f}, "
          f"file-backed pages of the mapped index {after['RssFile']:.0f}), peak {after['VmHWM']:.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000, help="vectors in the collection")
    ap.add_argument("--dim", type=int, default=512, help="vector dimension")
    ap.add_argument("--queries", type=int, default=200, help="image queries and text queries each")
    ap.add_argument("--dir", default=str(CACHE / "big"), help="where the source, the index and its vectors go")
    ap.add_argument("--nprobe", default="16,32,64,128", help="nprobe values to sweep (comma-separated)")
    ap.add_argument("--factors", default="10,20", help="refine factors to sweep (candidates per result)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and the index")
    ap.add_argument("--search-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.search_only:
        search_process(args)
        return
    print(machine())
    folder = Path(args.dir)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    gen = Generator(args.n, args.dim)
    with Timer() as t:
        source = generate(folder / "source.f16", gen, args.n)
    print(f"generated {args.n:,} vectors of dim {args.dim} in {t.seconds:.0f} s (float16 source file)", flush=True)
    img_q = gen.images(10**6, args.queries)  # held out: a chunk number no build reads
    txt_q = gen.texts(args.queries)
    with Timer() as t:
        np.savez(folder / "queries.npz", image_q=img_q, image_gt=exact_top(source, args.n, img_q),
                 text_q=txt_q, text_gt=exact_top(source, args.n, txt_q))
    print(f"exact top-10 of {2 * args.queries} queries in {t.seconds:.0f} s", flush=True)
    rss_before = peak_rss_mib()
    index, times = build(source, args.n, folder / "images.faiss")
    meta = index.sidecar()
    del index
    disk = {name: (folder / name).stat().st_size for name in ("images.faiss", "images.faiss.f16")}
    print(f"build: {', '.join(f'{k} {v:.0f}' for k, v in times.items())}, total {sum(times.values()):.0f} s; "
          f"peak memory of this process {peak_rss_mib():.0f} MiB (before the build {rss_before:.0f})")
    print(f"index: {json.dumps({k: meta[k] for k in ('nlist', 'nprobe', 'storage', 'opq', 'quantizer')})}")
    print(f"on disk: codes+ids {disk['images.faiss'] / 2**20:.0f} MiB, exact float16 vectors "
          f"{disk['images.faiss.f16'] / 2**20:.0f} MiB", flush=True)
    subprocess.run([sys.executable, __file__, "--search-only", "--dir", args.dir, "--nprobe", args.nprobe,
                    "--factors", args.factors], check=True)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
