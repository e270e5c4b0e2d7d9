"""The relevance cutoff on the emoji set: do absent concepts return nothing, are real matches kept?

Protocol (issue 15): index one style's images for half of the concepts (a
seeded split), query with the captions of all concepts. For each threshold:

- *absent → nothing*: the share of queries whose concept is not indexed for
  which no top-10 result reaches the threshold;
- *matches kept*: of the queries whose concept is indexed and whose own image
  is in the top 10, the share whose own image reaches the threshold.

Besides ``relevance`` (mmsearch.relevance: a z-score against the query's scores
over a sample of the collection) it scores alternatives on the same hits, to
show why that one was chosen: the raw cosine score, a z-score against the
query's own neighbours at ranks 11-100 (the "tail"), and the image side: a
z-score of the hit's score against that image's scores over a bank of texts
that are not queries (open_clip's 1,000 ImageNet class prompts), alone and
added to ``relevance``; and, for a trained model with an exemplar memory,
``relevance`` of the memory's search vector (what ``--rerank`` searches
with for a training caption) over its own top 10.

    python bench/cutoff.py --model /tmp/emoji-model --pairs /tmp/emoji/facebook.jsonl

Writes ``docs/cutoff.md``'s table to stdout, a PNG curve (``--plot``) and a
JSON of the curves (``--json``). The images stay where they are (their licence
allows evaluation only); only the figures go into the project.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES  # noqa: E402

from mmsearch.exemplars import ExemplarMemory  # noqa: E402
from mmsearch.home import Home  # noqa: E402
from mmsearch.indexer import index_paths  # noqa: E402
from mmsearch.relevance import AUTO_CUTOFF, background, relevance  # noqa: E402
from mmsearch.settings import resolve  # noqa: E402

TOP = 10
TAIL = (10, 100)  # ranks 11..100 for the "tail" alternative


def load_pairs(path: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(row["image"], row["text"]) for row in rows]


def measure(model: str, pairs_file: Path, seed: int, workdir: Path) -> dict:
    pairs = load_pairs(pairs_file)
    order = np.random.default_rng(seed).permutation(len(pairs))
    present = set(order[: len(pairs) // 2].tolist())
    settings = resolve(home=workdir / "home", model=model, device="cpu", batch_size=64, workers=0)
    started = time.perf_counter()
    with Home.open(settings) as home:
        index_paths(home, [pairs[i][0] for i in sorted(present)], progress=False)
        indexed = time.perf_counter() - started
        encoder = home.encoder()
        queries = encoder.embed_texts([text for _, text in pairs])
        index = home.index("image")
        paths = home.catalog.image_paths(home.catalog.ids("image").tolist())
        id_of = {p: i for i, p in paths.items()}
        sample = background(home, "image")
        scores, ids = index.search(queries, TAIL[1])
        # the image side: each image's scores against a bank of texts that are not the queries
        # (open_clip's ImageNet class names in its "a photo of a ..." prompt)
        bank = encoder.embed_texts([f"a photo of a {name}." for name in IMAGENET_CLASSNAMES])
        vecs = home.catalog.vectors("image", list(paths), home.dim)
        against = {i: bank @ v for i, v in vecs.items()}
        image_mean = {i: float(a.mean()) for i, a in against.items()}
        image_std = {i: max(float(a.std()), 1e-6) for i, a in against.items()}
        # the exemplar memory of a trained model (what --rerank adds): each caption query's search vector
        # q + w·e ranks by the dual score plus the picture's likeness to the caption's training drawings
        memory = ExemplarMemory.load(Path(model)) if Path(model).is_dir() else None
        expanded = queries.copy()
        for q, (_, text) in enumerate(pairs):
            vector = memory.expanded_query(text, queries[q]) if memory is not None else None
            if vector is not None:
                expanded[q] = vector
        memory_scores, memory_ids = index.search(expanded, TOP)
    rows = []
    for q, (image, _) in enumerate(pairs):
        top_scores, top_ids = scores[q, :TOP], ids[q, :TOP]
        z = relevance(top_scores, queries[q], sample)
        tail = scores[q, TAIL[0]:TAIL[1]]
        tail_z = (top_scores - tail.mean()) / max(tail.std(), 1e-6)
        image_z = np.array([(s - image_mean[int(i)]) / image_std[int(i)] for s, i in zip(top_scores, top_ids)])
        both = z + image_z
        own = id_of.get(image)
        where = np.flatnonzero(top_ids == own) if own is not None else np.zeros(0, int)
        memory_z = relevance(memory_scores[q], expanded[q], sample)
        memory_where = np.flatnonzero(memory_ids[q] == own) if own is not None else np.zeros(0, int)
        rows.append({
            "present": q in present,
            "own_in_top": bool(len(where)),
            # absent queries: the best value of any top-10 hit; present: the own image's value
            "relevance": float(z[where[0]] if len(where) else z.max()),
            "raw": float(top_scores[where[0]] if len(where) else top_scores.max()),
            "tail": float(tail_z[where[0]] if len(where) else tail_z.max()),
            "image_z": float(image_z[where[0]] if len(where) else image_z.max()),
            "both_z": float(both[where[0]] if len(where) else both.max()),
            # its own top 10 (the memory re-ranks the collection): "own_in_top" for this key is memory_in_top
            "memory_in_top": bool(len(memory_where)),
            "memory": float(memory_z[memory_where[0]] if len(memory_where) else memory_z.max()),
        })
    return {"rows": rows, "index_seconds": indexed, "images": len(present), "queries": len(pairs)}


def matched(rows: list[dict], key: str) -> np.ndarray:
    """``key``'s values of the present queries whose own image is in the top 10 (the memory has its own)."""
    top = "memory_in_top" if key == "memory" else "own_in_top"
    return np.array([r[key] for r in rows if r["present"] and r[top]])


def curve(rows: list[dict], key: str, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(absent → nothing, matches kept) at each threshold."""
    absent = np.array([r[key] for r in rows if not r["present"]])
    kept = matched(rows, key)
    return (
        np.array([(absent < t).mean() for t in thresholds]),
        np.array([(kept >= t).mean() for t in thresholds]),
    )


def at_kept(rows: list[dict], key: str, kept: float) -> tuple[float, float]:
    """The highest threshold that keeps at least ``kept`` of the matches, and absent → nothing there."""
    values = np.sort(matched(rows, key))
    threshold = float(values[int(np.floor((1 - kept) * len(values)))])
    absent = np.array([r[key] for r in rows if not r["present"]])
    return threshold, float((absent < threshold).mean())


def plot(path: Path, thresholds: np.ndarray, nothing: np.ndarray, kept: np.ndarray, title: str) -> None:
    """A small line chart drawn with PIL (no plotting library needed)."""
    from PIL import Image, ImageDraw

    w, h, m = 640, 400, 50
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    x0, x1, y0, y1 = m, w - 20, h - m, 30
    lo, hi = float(thresholds[0]), float(thresholds[-1])

    def xy(t: float, v: float) -> tuple[float, float]:
        return x0 + (t - lo) / (hi - lo) * (x1 - x0), y0 + v * (y1 - y0)

    for v in np.linspace(0, 1, 6):
        d.line([xy(lo, v), xy(hi, v)], fill=(225, 225, 225))
        d.text((8, xy(lo, v)[1] - 6), f"{v:.0%}", fill="black")
    for t in np.arange(np.ceil(lo), hi + 1e-9, 1.0):
        d.line([xy(t, 0), xy(t, 1)], fill=(235, 235, 235))
        d.text((xy(t, 0)[0] - 4, y0 + 6), f"{t:g}", fill="black")
    for level in (0.8, 0.9):
        d.line([xy(lo, level), xy(hi, level)], fill=(200, 200, 200), width=1)
    d.line([xy(AUTO_CUTOFF, 0), xy(AUTO_CUTOFF, 1)], fill=(120, 120, 120), width=1)
    d.text((xy(AUTO_CUTOFF, 1)[0] + 3, y1 + 2), "auto", fill=(90, 90, 90))
    for values, colour, name, row in ((nothing, (200, 40, 40), "absent concept: nothing returned", 0),
                                      (kept, (30, 90, 200), "match in top 10: kept", 1)):
        d.line([xy(float(t), float(v)) for t, v in zip(thresholds, values)], fill=colour, width=3)
        d.rectangle([x0 + 10, y1 + 10 + 16 * row, x0 + 24, y1 + 20 + 16 * row], fill=colour)
        d.text((x0 + 30, y1 + 9 + 16 * row), name, fill="black")
    d.text((x0, 8), title, fill="black")
    d.text(((x0 + x1) // 2 - 40, h - 20), "relevance threshold", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/tmp/emoji-model")
    parser.add_argument("--pairs", type=Path, default=Path("/tmp/emoji/facebook.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="write the curve as a PNG here")
    parser.add_argument("--json", type=Path, default=None, help="write the curves as JSON here")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="mmsearch-cutoff-") as tmp:
        result = measure(args.model, args.pairs, args.seed, Path(tmp))
    rows = result["rows"]
    n_absent = sum(not r["present"] for r in rows)
    n_present = len(rows) - n_absent
    n_matched = sum(r["present"] and r["own_in_top"] for r in rows)
    print(f"{result['images']} images indexed ({result['index_seconds']:.0f} s), {result['queries']} queries: "
          f"{n_absent} absent, {n_present} present, of which {n_matched} with their image in the top {TOP} "
          f"({sum(r['present'] and r['memory_in_top'] for r in rows)} with the exemplar memory's search vector)")

    thresholds = np.round(np.arange(0.0, 4.01, 0.1), 2)
    nothing, kept = curve(rows, "relevance", thresholds)
    print("\n| relevance threshold | absent → nothing | matches kept |")
    print("|---:|---:|---:|")
    for t, a, k in zip(thresholds, nothing, kept):
        if 1.5 <= float(t) <= 3.0 or float(t) == int(t):
            mark = " (auto)" if abs(float(t) - AUTO_CUTOFF) < 1e-9 else ""
            print(f"| {t:g}{mark} | {a:.1%} | {k:.1%} |")

    print("\n| calibration | threshold keeping ≥ 90% of matches | absent → nothing there |")
    print("|---|---:|---:|")
    for key, name in (("relevance", "relevance (z vs collection sample)"), ("tail", "z vs own neighbours 11-100"),
                      ("raw", "raw cosine score"), ("image_z", "z of the image vs a bank of 1,000 ImageNet prompts"),
                      ("both_z", "query z + image z"),
                      ("memory", "relevance of the exemplar memory's search vector (--rerank)")):
        threshold, share = at_kept(rows, key, 0.90)
        print(f"| {name} | {threshold:.3f} | {share:.1%} |")
    absent = np.array([r["relevance"] for r in rows if not r["present"]])
    auc = float((matched(rows, "relevance")[:, None] > absent[None, :]).mean())
    print(f"\nP(a match's relevance > an absent query's best top-{TOP} relevance) = {auc:.3f} "
          "(0.5: the two cannot be told apart by any threshold)")
    for key in ("tail", "raw", "image_z", "both_z", "memory"):
        a = np.array([r[key] for r in rows if not r["present"]])
        m = matched(rows, key)
        print(f"  the same for {key}: {float((m[:, None] > a[None, :]).mean()):.3f}")
    auto_nothing, auto_kept = curve(rows, "relevance", np.array([AUTO_CUTOFF]))
    print(f"\nauto ({AUTO_CUTOFF:g}): absent → nothing {auto_nothing[0]:.1%}, matches kept {auto_kept[0]:.1%} "
          f"(targets ≥ 80% and ≥ 90%: {'met' if auto_nothing[0] >= 0.8 and auto_kept[0] >= 0.9 else 'NOT met'})")
    if args.plot:
        plot(args.plot, thresholds, nothing, kept,
             f"{Path(args.pairs).stem}: {result['images']} images, {result['queries']} caption queries")
    if args.json:
        args.json.write_text(json.dumps({
            "thresholds": thresholds.tolist(), "absent_nothing": nothing.tolist(), "matches_kept": kept.tolist(),
            "auto": AUTO_CUTOFF, "rows": rows,
        }))


if __name__ == "__main__":
    main()
