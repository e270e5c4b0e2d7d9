"""Shared helpers for the benchmarks: machine description, a ViT-B-32-sized model, test data.

Benchmarks are run by hand (``python bench/NAME.py``), never by pytest. Each
prints a table and, as its last line, its key ratio or figure.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Where generated data and models are cached between runs.
CACHE = Path(os.environ.get("MMSEARCH_BENCH_CACHE", "/tmp/mmsearch-bench"))


def machine() -> str:
    """One line describing the machine: CPU model, cores, memory, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f"{mem_kb / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration):
        mem = "?"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = []
    for mod in ("torch", "faiss", "PIL", "open_clip"):
        try:
            m = __import__(mod)
            versions.append(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError:
            pass
    return f"machine: {cpu}, {cores} usable cores, {mem} RAM, Python {platform.python_version()}; " + ", ".join(versions)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (VmHWM: unlike ru_maxrss, not inherited across fork+exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    """(p50, p95) in milliseconds."""
    ms = sorted(s * 1000 for s in samples_s)
    p95 = ms[min(len(ms) - 1, int(round(0.95 * (len(ms) - 1))))]
    return statistics.median(ms), p95


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def vit_b32_dir(folder: Path | None = None) -> Path:
    """open_clip's ViT-B-32 architecture with random weights, saved in local-dir layout.

    Speed does not depend on the weights' values, so this measures what the
    default model costs without downloading it.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder = folder or CACHE / "vit-b-32-random"
    weights = folder / "open_clip_model.safetensors"
    if weights.is_file():
        return folder
    cfg = open_clip.get_model_config("ViT-B-32")
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    folder.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD), "size": 224}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return folder


def photo(seed: int, size: tuple[int, int] = (3000, 2000)):
    """A photo-like picture: smooth colour gradients, blobs and sensor-like noise.

    JPEG sizes land near real camera photos (~1-2 MB at 6 MP, quality 90),
    unlike flat colours (tiny files) or pure noise (huge ones).
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    sw, sh = w // 8, h // 8  # build at low resolution, upscale smoothly, add fine noise
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    base = np.zeros((sh, sw, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        base[..., c] = 128 + 60 * np.sin(a * x / 40 + b * y / 30 + p * 6)
    for _ in range(12):
        cx, cy, r = rng.uniform(0, sw), rng.uniform(0, sh), rng.uniform(10, 80)
        colour = rng.uniform(-90, 90, 3)
        mask = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
        base += mask[..., None] * colour
    texture = rng.normal(0, 12, (sh, sw, 1)).astype(np.float32)
    small = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8))
    big = np.asarray(small.resize((w, h), Image.BILINEAR), dtype=np.int16)
    noise = rng.integers(-10, 11, (h, w, 1), dtype=np.int16)
    return Image.fromarray(np.clip(big + noise, 0, 255).astype(np.uint8))


def make_photos(folder: Path, count: int, size: tuple[int, int] = (3000, 2000)) -> Path:
    """``count`` photo-like JPEGs in ``folder`` (kept between runs)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = folder / f"photo_{i:05d}.jpg"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            photo(i, size).save(tmp, "JPEG", quality=90)
            os.replace(tmp, path)
    return folder


def clustered_vectors(n: int, dim: int = 512, clusters: int | None = None, seed: int = 0) -> np.ndarray:
    """Unit vectors that resemble CLIP embeddings: a shared mean direction, many
    clusters of varying spread, and anisotropic within-cluster noise.

    Real CLIP image embeddings are not uniform on the sphere: they sit in a
    narrow cone (pairwise cosine ~0.3-0.6) and group by subject. Uniform noise
    would make ANN recall look artificially bad (no structure) or good.
    """
    rng = np.random.default_rng(seed)
    clusters = clusters or max(8, int(np.sqrt(n)))
    mean = rng.normal(size=dim).astype(np.float32)
    mean /= np.linalg.norm(mean)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    centres = 0.6 * mean + 0.8 * centres  # the cone
    spread = rng.uniform(0.5, 1.2, clusters).astype(np.float32)
    scales = np.linspace(1.6, 0.3, dim).astype(np.float32)  # anisotropic: a few strong directions
    out = np.empty((n, dim), np.float32)
    step = 100_000
    for start in range(0, n, step):
        m = min(step, n - start)
        which = rng.integers(0, clusters, m)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * scales / np.sqrt(dim)
        block = centres[which] + noise * spread[which, None]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:start + m] = block
    return out


def clip_like_vectors(n: int, n_queries: int = 200, dim: int = 512, seed: int = 0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images, image_queries, text_queries)``: unit vectors shaped like CLIP ViT-B-32 embeddings.

    What makes ANN recall on real CLIP vectors hard, reproduced here:

    - a cone: every image vector shares a mean direction (image-image cosine
      ~0.4-0.5 on average, not 0 as on the sphere);
    - a low effective dimension: the semantic variation has a power-law
      spectrum (the top 10 principal directions hold ~25-40% of the variance);
    - topics in super-topics, heavy-tailed in size (log-normal weights: a few
      huge topics, many small ones), and diffuse: an image's 10th neighbour at
      1M is at cosine ~0.75, not a tight ball that one IVF cell holds;
    - bursts of near-duplicates (10% of images are close copies of another);
    - text queries across a modality gap: they sit in their own cone (text-image
      cosine ~0.15 on average, ~0.35-0.4 for the best match, text-text ~0.65),
      carry text-only variation images do not share, and 40% of them mix two
      concepts, so their neighbours spread over cells built from images.

    Image queries are held-out images. :func:`embedding_stats` measures these
    properties so a benchmark can print them.
    """
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0].astype(np.float32)
    spectrum = (np.arange(1, dim + 1) ** -0.4).astype(np.float32)
    spectrum /= np.sqrt((spectrum ** 2).sum())

    def semantic(m: int) -> np.ndarray:  # m random directions with the spectrum, norm ~1
        return (rng.standard_normal((m, dim), dtype=np.float32) * spectrum) @ basis.T

    n_topics = max(16, n // 150)
    supers = semantic(max(4, int(np.sqrt(n_topics))))
    topics = 0.75 * supers[rng.integers(0, len(supers), n_topics)] + 0.66 * semantic(n_topics)
    weights = rng.lognormal(0, 1.3, n_topics)
    weights /= weights.sum()
    spread = rng.uniform(0.8, 1.4, n_topics).astype(np.float32)
    image_mean = rng.standard_normal(dim).astype(np.float32)
    image_mean /= np.linalg.norm(image_mean)
    gap = rng.standard_normal(dim).astype(np.float32)
    gap -= (gap @ image_mean) * image_mean
    gap /= np.linalg.norm(gap)
    text_mean = 0.3 * image_mean + 0.95 * gap

    total = n + n_queries
    out = np.empty((total, dim), np.float32)
    topic = rng.choice(n_topics, total, p=weights)
    for start in range(0, total, 100_000):
        stop = min(total, start + 100_000)
        out[start:stop] = topics[topic[start:stop]] + semantic(stop - start) * spread[topic[start:stop], None]
    dup = rng.random(total) < 0.10
    source = rng.integers(0, total, int(dup.sum()))
    out[dup] = out[source] + 0.25 * spread[topic[source], None] * semantic(int(dup.sum()))
    out += 0.85 * image_mean * np.linalg.norm(out, axis=1, keepdims=True)
    out /= np.linalg.norm(out, axis=1, keepdims=True)

    concept = topics[rng.choice(n_topics, n_queries, p=weights)] + 0.6 * semantic(n_queries)
    mixed = rng.random(n_queries) < 0.4
    concept[mixed] += 0.6 * topics[rng.choice(n_topics, int(mixed.sum()), p=weights)]
    concept /= np.linalg.norm(concept, axis=1, keepdims=True)
    text_only = rng.standard_normal((n_queries, dim)).astype(np.float32)
    text_only /= np.linalg.norm(text_only, axis=1, keepdims=True)
    texts = text_mean + 0.45 * concept + 0.55 * text_only
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    return out[:n], out[n:], texts.astype(np.float32)


def embedding_stats(images: np.ndarray, texts: np.ndarray, sample: int = 2000) -> str:
    """One line of the properties :func:`clip_like_vectors` aims at, measured."""
    rng = np.random.default_rng(1)
    s = images[rng.choice(len(images), min(sample, len(images)), replace=False)]
    upper = np.triu_indices(len(s), 1)
    centred = s - s.mean(0)
    var = np.linalg.svd(centred, compute_uv=False) ** 2
    return (f"mean cosine image-image {(s @ s.T)[upper].mean():.2f}, text-image {(texts @ s.T).mean():.2f}, "
            f"text-text {(texts @ texts.T)[np.triu_indices(len(texts), 1)].mean():.2f}; "
            f"|mean image - mean text| {np.linalg.norm(s.mean(0) - texts.mean(0)):.2f}; "
            f"top-10 principal directions hold {var[:10].sum() / var.sum():.0%} of the image variance")


class Timer:
    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
