"""Compare re-ranker training variants side by side on the emoji cross-style benchmark.

    python scripts/rerank_experiments.py TWITTER.jsonl FACEBOOK.jsonl OUTDIR VARIANT... [--device cuda] [--jobs 4]

Each VARIANT is ``name`` or ``name:key=value,key=value`` with TrainOptions
fields (e.g. ``joint:scorer=fusion,itm_weight=1,rerank_epochs=0``). Every
variant trains on TWITTER (seed 0 unless given) and is evaluated on FACEBOOK
with the dual encoder alone and with re-ranking; one JSON line per variant is
appended to OUTDIR/results.jsonl and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from pathlib import Path


def parse_variant(text: str) -> tuple[str, dict]:
    from mmsearch.train import TrainOptions

    name, _, rest = text.partition(":")
    types = {f.name: f.type for f in fields(TrainOptions)}
    options: dict = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kind = str(types[key])
        options[key] = int(value) if kind == "int" else float(value) if "float" in kind else value
    return name, options


def run_one(args: tuple[str, dict, str, str, str, str]) -> dict:
    name, options, twitter, facebook, outdir, device, force = args
    import torch

    from mmsearch.evaluate import evaluate
    from mmsearch.settings import resolve
    from mmsearch.train import TrainOptions, train

    torch.set_num_threads(2)
    import mmsearch.train as train_module

    if force:  # diagnostics: save the re-ranker whatever validation says (the report still tells)
        train_module.accept_reranker = lambda dual, rerank: True
    out = Path(outdir) / name
    started = time.perf_counter()
    opts = TrainOptions(pairs=Path(twitter), out=out / "model", device=device, **{"epochs": 20, **options})
    report = train(opts, progress=False, say=lambda _: None).as_dict()
    row = {"name": name, "options": options, "train_s": round(time.perf_counter() - started, 1),
           "val_dual": report["val_dual"], "val_rerank": report["val_rerank"],
           "accepted": all(report["val_rerank"][d]["R@1"] >= report["val_dual"][d]["R@1"] for d in report["val_dual"])}
    settings = resolve(home=out / "home-dual", model=str(out / "model"), device=device)
    row["fb_dual"] = evaluate(Path(facebook), settings, progress=False)
    if report["reranker_saved"]:
        settings = resolve(home=out / "home-rerank", model=str(out / "model"), device=device)
        row["fb_rerank"] = evaluate(Path(facebook), settings, rerank=True, progress=False)
    return row


def fmt(r: dict | None) -> str:
    if not r:
        return " " * 33
    a, b = r["text_to_image"], r["image_to_text"]
    return f"{100*a['R@1']:5.1f} {100*a['R@5']:5.1f} {100*a['R@10']:5.1f} | {100*b['R@1']:5.1f} {100*b['R@5']:5.1f} {100*b['R@10']:5.1f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("twitter")
    parser.add_argument("facebook")
    parser.add_argument("outdir")
    parser.add_argument("variants", nargs="+")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--force", action="store_true", help="evaluate re-rankers that validation would reject")
    a = parser.parse_args()
    Path(a.outdir).mkdir(parents=True, exist_ok=True)
    jobs = [(*parse_variant(v), a.twitter, a.facebook, a.outdir, a.device, a.force) for v in a.variants]
    results = Path(a.outdir) / "results.jsonl"
    with ProcessPoolExecutor(a.jobs) as pool:
        for row in pool.map(run_one, jobs):
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{row['name']:>14s} {row['train_s']:6.1f}s {'ok ' if row['accepted'] else 'REJ'} val dual {fmt(row['val_dual'])} rerank {fmt(row['val_rerank'])}", flush=True)
            print(f"{'':>14s} {'':7s} FB  dual {fmt(row['fb_dual'])} rerank {fmt(row.get('fb_rerank'))}", flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
