"""``mmsearch duplicates``: how fast on 100k images, how precise on generated copies of real images.

Two measurements:

``--speed``: N synthetic CLIP-like vectors (default 100,000) in a catalog, 2% of
them planted near-copies of another (cosine ~0.97-0.99), each row with an empty
file so the vanished-file check runs too. Times ``find_duplicates`` for each
kind and reports the recall of the planted pairs.

``--quality``: a generated set made from real images: each source image plus
five copies (a byte copy, a JPEG re-encode at quality 60, a 50-90% resize, a
5-10% crop, a brightness change by 0.7-1.3x), among the other sources, which
include distinct images of similar concepts (the same emoji subcategory, skin
tone variants). Indexes all of it with a real model and reports precision and
recall of near-duplicate pairs for embedding similarity, a perceptual hash
(DCT pHash, 64 bits) and both, over a sweep of thresholds, and checks that no
exact group holds files whose bytes differ.

    python bench/duplicates.py --speed 100000
    python bench/duplicates.py --quality --model /tmp/emoji-model \\
        --images /work/shared/datasets/emoji --style facebook --sources 400

The generated images are written to a temporary folder and deleted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CACHE, clustered_vectors, machine, make_photos  # noqa: E402

from mmsearch.decode import content_hash  # noqa: E402
from mmsearch.duplicates import NEAR_CANDIDATES, THRESHOLDS, find_duplicates, pixel_similarity, similar_pairs  # noqa: E402
from mmsearch.home import Home  # noqa: E402
from mmsearch.settings import resolve  # noqa: E402

VARIANTS = ("copy", "jpeg60", "resize", "crop", "brightness")


# -- speed ----------------------------------------------------------------------


def speed(n: int, dim: int, workdir: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = clustered_vectors(n, dim)
    planted = n // 50
    originals = rng.choice(n - planted, planted, replace=False)
    noisy = vectors[originals] + rng.normal(0, 0.15 / np.sqrt(dim), (planted, dim)).astype(np.float32)
    vectors[n - planted:] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    truth = {(int(o), n - planted + i) for i, o in enumerate(originals)}
    sims = np.einsum("ij,ij->i", vectors[originals], vectors[n - planted:])
    files = workdir / "files"
    files.mkdir()
    settings = resolve(home=workdir / "home", model="local-dir:/nowhere")
    with Home.open(settings) as home:
        home.catalog.set_meta({"model": home.spec.canonical, "dim": str(dim)})
        stored = home.catalog.stored(vectors)
        for start in range(0, n, 10_000):
            rows = []
            for i in range(start, min(n, start + 10_000)):
                path = files / f"img_{i:07d}.jpg"
                path.touch()
                rows.append({"path": str(path), "size": 0, "mtime_ns": 0, "content_hash": content_hash(str(i).encode()),
                             "width": 1, "height": 1, "vector": stored[i]})
            home.catalog.write_images(rows, [])
        print(f"{n:,} vectors of dim {dim} in a catalog, {planted:,} planted near-copies "
              f"(cosine {sims.min():.3f}-{sims.max():.3f})")
        for kind in ("exact", "similar"):
            started = time.perf_counter()
            groups = find_duplicates(home, kind)
            seconds = time.perf_counter() - started
            pairs = {(a, b) for g in groups for a, b in itertools.combinations(sorted(i - 1 for i, _ in g.items), 2)}
            found = len(truth & pairs)
            extra = f", planted pairs found {found}/{len(truth)} ({found / len(truth):.1%})" if kind != "exact" else ""
            print(f"  {kind:8s} {seconds:6.1f} s  {len(groups):,} groups{extra}")
        # near = candidate pairs from the vectors, then a pixel check of the candidates' files
        started = time.perf_counter()
        first, second, _ = similar_pairs(vectors, NEAR_CANDIDATES)
        seconds = time.perf_counter() - started
        found = len(truth & set(zip(first.tolist(), second.tolist())))
        files_needed = len(set(first.tolist()) | set(second.tolist()))
        print(f"  near, candidates (cosine >= {NEAR_CANDIDATES}): {seconds:.1f} s, {len(first):,} pairs over "
              f"{files_needed:,} files, planted pairs among them {found}/{len(truth)}")
    photos = sorted(make_photos(CACHE / "photos-1600", 100, (1600, 1200)).glob("*.jpg"))
    rows = np.arange(len(photos))
    started = time.perf_counter()
    pixel_similarity([str(p) for p in photos], rows[:-1], rows[1:])
    per_file = (time.perf_counter() - started) / len(photos)
    print(f"  near, pixel check: {per_file * 1000:.1f} ms per candidate file (1600x1200 JPEGs), "
          f"so {per_file * files_needed:.0f} s for this collection's candidates if they were such photos")


# -- quality --------------------------------------------------------------------


def flatten(path: Path):
    """The image as mmsearch decodes it: RGB, transparency over white."""
    from PIL import Image

    img = Image.open(path)
    img.load()
    if img.mode in ("RGBA", "LA", "P"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def make_set(sources: list[Path], out: Path, seed: int) -> tuple[list[Path], list[int]]:
    """Each source and its five copies; returns the files and the source number of each."""
    from PIL import ImageEnhance

    rng = np.random.default_rng(seed)
    files, group = [], []
    for s, src in enumerate(sources):
        folder = out / f"{s:04d}"
        folder.mkdir(parents=True)
        original = folder / f"original{src.suffix}"
        shutil.copy(src, original)
        img = flatten(src)
        w, h = img.size
        made = {"copy": folder / f"copy{src.suffix}"}
        shutil.copy(src, made["copy"])
        made["jpeg60"] = folder / "jpeg60.jpg"
        img.save(made["jpeg60"], "JPEG", quality=60)
        scale = rng.uniform(0.5, 0.9)
        made["resize"] = folder / "resize.png"
        img.resize((max(1, round(w * scale)), max(1, round(h * scale)))).save(made["resize"])
        cut = rng.uniform(0.05, 0.10)
        dx, dy = round(w * cut), round(h * cut)
        left, top = int(rng.integers(0, dx + 1)), int(rng.integers(0, dy + 1))
        made["crop"] = folder / "crop.png"
        img.crop((left, top, w - (dx - left), h - (dy - top))).save(made["crop"])
        made["brightness"] = folder / "brightness.png"
        factor = rng.choice([rng.uniform(0.7, 0.9), rng.uniform(1.1, 1.3)])
        ImageEnhance.Brightness(img).enhance(factor).save(made["brightness"])
        for path in (original, *made.values()):
            files.append(path)
            group.append(s)
    return files, group


def phash(path: Path) -> int:
    """A 64-bit DCT perceptual hash: the sign of the 8x8 lowest frequencies of a 32x32 grey image."""
    from PIL import Image
    from scipy.fft import dctn

    grey = np.asarray(flatten(path).convert("L").resize((32, 32), Image.LANCZOS), dtype=np.float32)
    low = dctn(grey, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


#: The crop alignments the pixel check tries: (scale of the side kept, offsets along each axis).
ALIGNMENTS = [(1.0, (0.0,))] + [(scale, (0.0, 0.25, 0.5, 0.75, 1.0)) for scale in (0.96, 0.93, 0.9)]


def thumbnails(path: Path, size: int = 32) -> np.ndarray:
    """Colour thumbnails of the image and of crops of it, each mean-centred and unit-norm (NCC by dot product)."""
    from PIL import Image

    img = flatten(path)
    w, h = img.size
    out = []
    for scale, offsets in ALIGNMENTS:
        cw, ch = w * scale, h * scale
        for fx in offsets:
            for fy in offsets:
                x, y = (w - cw) * fx, (h - ch) * fy
                a = np.asarray(img.resize((size, size), Image.BILINEAR, box=(x, y, x + cw, y + ch)), np.float32).ravel()
                a -= a.mean()
                out.append(a / (np.linalg.norm(a) + 1e-6))
    return np.stack(out)


def all_pairs_pixels(files: list[Path]) -> np.ndarray:
    """All-pairs best normalised cross-correlation of one image with crops of the other, either way round."""
    views = np.stack([thumbnails(p) for p in files])
    n, nv, d = views.shape
    best = (views[:, 0] @ views.reshape(n * nv, d).T).reshape(n, n, nv).max(axis=2)
    return np.maximum(best, best.T)


def pr(predicted: set[tuple[int, int]], truth: set[tuple[int, int]]) -> tuple[float, float]:
    hit = len(predicted & truth)
    return (hit / len(predicted) if predicted else 1.0), hit / len(truth)


def quality(args: argparse.Namespace, workdir: Path) -> None:
    from mmsearch.indexer import index_paths

    rows = [json.loads(line) for line in (args.images / "pairs.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["style"] == args.style]
    rng = np.random.default_rng(args.seed)
    chosen = sorted(rng.choice(len(rows), min(args.sources, len(rows)), replace=False).tolist())
    sources = [args.images / rows[i]["image"] for i in chosen]
    subcategory = [rows[i]["subcategory"] for i in chosen]
    files, group = make_set(sources, workdir / "set", args.seed)
    settings = resolve(home=workdir / "home", model=args.model, device="cpu", workers=0)
    started = time.perf_counter()
    with Home.open(settings) as home:
        index_paths(home, [workdir / "set"], progress=False)
        print(f"{len(sources)} {args.style} sources x 6 = {len(files)} images indexed "
              f"({time.perf_counter() - started:.0f} s) with {args.model}")
        row_of = {str(p): k for k, p in enumerate(files)}
        paths = home.catalog.image_paths(home.catalog.ids("image").tolist())
        id_of = {path: i for i, path in paths.items()}
        ids = [id_of[str(p)] for p in files]
        by_id = home.catalog.vectors("image", ids, home.dim)
        vectors = np.stack([by_id[i] for i in ids])
        truth = {(a, b) for a, b in itertools.combinations(range(len(files)), 2) if group[a] == group[b]}
        similar_concepts = {(a, b) for a, b in itertools.combinations(range(len(files)), 2)
                            if group[a] != group[b] and subcategory[group[a]] == subcategory[group[b]]}
        print(f"{len(truth):,} near-duplicate pairs; {len(similar_concepts):,} pairs of distinct images "
              "of the same subcategory among the negatives")

        # embedding similarity
        first, second, sims = similar_pairs(vectors, 0.5)
        emb = {(int(a), int(b)): float(s) for a, b, s in zip(first, second, sims)}
        # perceptual hash, all pairs
        hashes = np.array([phash(p) for p in files], dtype=np.uint64)
        bits = np.unpackbits(hashes.view(np.uint8).reshape(-1, 8), axis=1).astype(np.int16)
        hamming = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)

        print("\n| method | threshold | precision | recall | false pairs of similar concepts |")
        print("|---|---:|---:|---:|---:|")
        for t in (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98):
            predicted = {p for p, s in emb.items() if s >= t}
            p, r = pr(predicted, truth)
            print(f"| embedding cosine ≥ | {t:.2f} | {p:.3f} | {r:.3f} | {len(predicted & similar_concepts)} |")
        for d in (4, 6, 8, 10, 12, 14, 16, 20):
            i, j = np.nonzero(np.triu(hamming <= d, 1))
            predicted = set(zip(i.tolist(), j.tolist()))
            p, r = pr(predicted, truth)
            print(f"| pHash Hamming ≤ | {d} | {p:.3f} | {r:.3f} | {len(predicted & similar_concepts)} |")
        for t, d in itertools.product((0.85, 0.90, 0.95), (12, 16, 20)):
            predicted = {pair for pair, s in emb.items() if s >= t and hamming[pair] <= d}
            p, r = pr(predicted, truth)
            print(f"| both: cosine ≥ and Hamming ≤ | {t:.2f}, {d} | {p:.3f} | {r:.3f} | "
                  f"{len(predicted & similar_concepts)} |")

        ncc = all_pairs_pixels(files)
        for t in (0.90, 0.92, 0.94, 0.95, 0.96, 0.97):
            i, j = np.nonzero(np.triu(ncc >= t, 1))
            predicted = set(zip(i.tolist(), j.tolist()))
            p, r = pr(predicted, truth)
            print(f"| pixels: best NCC over crop alignments ≥ | {t:.2f} | {p:.3f} | {r:.3f} | "
                  f"{len(predicted & similar_concepts)} |")

        print("\nby kind of copy, embedding cosine at the default near threshold "
              f"({THRESHOLDS['near']}), pairs with the original:")
        for v, name in enumerate(VARIANTS, 1):
            found = [emb.get((6 * s, 6 * s + v), 0.0) for s in range(len(sources))]
            share = float(np.mean([f >= THRESHOLDS["near"] for f in found]))
            print(f"  {name:10s} recall {share:.3f}  lowest cosine {min(found):.3f}")

        for kind in ("near", "similar"):
            started = time.perf_counter()
            groups = find_duplicates(home, kind)
            seconds = time.perf_counter() - started
            predicted = {tuple(sorted((row_of[pa], row_of[pb])))
                         for g in groups for (_, pa), (_, pb) in itertools.combinations(g.items, 2)}
            p, r = pr(predicted, truth)
            print(f"mmsearch duplicates --kind {kind} (default {THRESHOLDS[kind]}): {len(groups)} groups, "
                  f"pairs precision {p:.3f} recall {r:.3f} ({seconds:.2f} s)")
        exact = find_duplicates(home, "exact")
        bad = sum(len({Path(p).read_bytes() for _, p in g.items}) != 1 for g in exact)
        print(f"mmsearch duplicates --kind exact: {len(exact)} groups, {bad} not byte-identical")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--speed", type=int, default=0, metavar="N", help="time N synthetic vectors")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--quality", action="store_true", help="precision/recall on generated copies")
    parser.add_argument("--model", default="/tmp/emoji-model")
    parser.add_argument("--images", type=Path, default=Path("/work/shared/datasets/emoji"))
    parser.add_argument("--style", default="facebook")
    parser.add_argument("--sources", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="mmsearch-dups-") as tmp:
        if args.speed:
            (Path(tmp) / "speed").mkdir()
            speed(args.speed, args.dim, Path(tmp) / "speed")
        if args.quality:
            (Path(tmp) / "quality").mkdir()
            quality(args, Path(tmp) / "quality")


if __name__ == "__main__":
    main()
