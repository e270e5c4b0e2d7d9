"""Time search with and without --rerank on an indexed home (model already loaded).

    python scripts/rerank_latency.py HOME "query one" "query two" ... [--reps N]

Prints the median milliseconds per query of text→image search (top 10) alone
and with re-ranking of the best K=50, the same for image→text with the first
indexed image as the query (if the home holds texts), and the bytes stored per
image for the re-ranker.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from mmsearch.home import Home
from mmsearch.rerank import TokenStore
from mmsearch.search import search
from mmsearch.settings import resolve

torch.set_num_threads(2)
parser = argparse.ArgumentParser()
parser.add_argument("home", type=Path)
parser.add_argument("queries", nargs="+")
parser.add_argument("--reps", type=int, default=3, help="passes over the queries per setting")
args = parser.parse_args()
home_dir, queries = args.home, args.queries
with Home.open(resolve(home=home_dir), create=False) as home:
    search(home, queries[0], k=10)  # load the model once

    def timed(**kwargs) -> float:
        runs = []
        todo = kwargs.pop("queries", queries)
        for _ in range(args.reps):
            for q in todo:
                start = time.perf_counter()
                search(home, q if "image" not in kwargs else None, **kwargs)
                runs.append(1000 * (time.perf_counter() - start))
        return statistics.median(runs)

    print(f"text→image top 10:            {timed(k=10):7.1f} ms")
    print(f"text→image top 10, rerank 50: {timed(k=10, rerank_k=50):7.1f} ms")
    if home.catalog.count("text"):
        image = Path(next(iter(home.catalog.image_states())))
        print(f"image→text top 10:            {timed(k=10, image=image, target='text', queries=[None]):7.1f} ms")
        print(f"image→text top 10, rerank 50: {timed(k=10, image=image, target='text', rerank_k=50, queries=[None]):7.1f} ms")
    store = TokenStore.open(home.settings.home, home.spec.canonical)
    if store is not None:
        print(f"re-ranker tokens: {store.tokens} × {store.dim} float16 = {store.row_bytes} bytes per image")
