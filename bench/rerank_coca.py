"""A CoCa re-ranker's cost: bytes per image and search --rerank latency at K=50, stored tokens against recomputed.

    python bench/rerank_coca.py                       # coca_ViT-B-32 with random weights, 120 images
    python bench/rerank_coca.py --images 200 --rounds 5

The model is open_clip's ``coca_ViT-B-32`` architecture with random weights
(speed does not depend on their values; the decoder's projection is given
random values so no shortcut applies). A home is indexed with generated
224 px pictures and as many texts; then, with the model loaded:

- text→image, tokens stored at index time (the shipped way): the decoder reads
  the candidates' stored tokens;
- text→image, tokens recomputed: the same search with the token store moved
  away, so the K candidates are decoded and run through the image tower again;
- image→text: the query image is encoded once (vector and decoder tokens);
  the decoder reads the K candidate texts. No store is involved.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from _common import CACHE, machine, table

import numpy as np
import torch


def coca_dir(name: str = "coca_ViT-B-32") -> Path:
    import open_clip
    from safetensors.torch import save_file

    folder = CACHE / f"{name.lower()}-random"
    weights = folder / "open_clip_model.safetensors"
    if weights.is_file():
        return folder
    cfg = open_clip.get_model_config(name)
    torch.manual_seed(0)
    model = open_clip.CoCa(**{k: v for k, v in cfg.items() if k != "custom_text"})
    torch.nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width ** -0.5)
    folder.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD), "size": 224}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return folder


def pictures(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((256, 256), Image.BILINEAR)
        paths.append(folder / f"p{i:04d}.png")
        img.save(paths[-1])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from mmsearch.home import Home
    from mmsearch.indexer import index_paths
    from mmsearch.search import search
    from mmsearch.settings import resolve
    from mmsearch.texts import add_texts

    model = coca_dir()
    work = CACHE / "rerank-coca"
    shutil.rmtree(work, ignore_errors=True)
    paths = pictures(work / "pictures", args.images)
    words = ["red", "green", "blue", "apple", "car", "face with tears of joy", "a dog on a mat", "heart", "star", "tree"]
    corpus = work / "texts.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"t{i}", "text": f"{words[i % 10]} {words[(i * 7) % 10]} {i}"}) + "\n"
                              for i in range(args.images)))
    settings = resolve(home=work / "home", model=str(model))
    started = time.perf_counter()
    with Home.open(settings) as home:
        index_paths(home, [str(p) for p in paths], progress=False)
        add_texts(home, corpus, progress=False)
    index_s = time.perf_counter() - started
    store = json.loads((work / "home" / "rerank" / "tokens.json").read_text())
    row_bytes = store["tokens"] * store["dim"] * 2

    queries = ["a red apple", "face with tears of joy", "a dog on a mat"]
    with Home.open(settings, create=False) as home:
        search(home, queries[0], k=10)  # load the model once
        search(home, queries[0], k=10, rerank_k=50)

        def timed(fn) -> float:
            runs = []
            for _ in range(args.rounds):
                for q in queries:
                    t = time.perf_counter()
                    fn(q)
                    runs.append(time.perf_counter() - t)
            return statistics.median(runs) * 1000

        rows = []
        rows.append(["text→image, alone", f"{timed(lambda q: search(home, q, k=10)):.0f} ms"])
        rows.append(["text→image, --rerank K=50, stored tokens", f"{timed(lambda q: search(home, q, k=10, rerank_k=50)):.0f} ms"])
        (work / "home" / "rerank").rename(work / "rerank-away")
        try:
            rows.append(["text→image, --rerank K=50, recomputed", f"{timed(lambda q: search(home, q, k=10, rerank_k=50)):.0f} ms"])
        finally:
            (work / "rerank-away").rename(work / "home" / "rerank")
        image_queries = [paths[1], paths[2], paths[3]]
        it = iter(image_queries * args.rounds)
        rows.append(["image→text, alone", f"{timed(lambda q: search(home, image=next(it), target='text', k=10)):.0f} ms"])
        it = iter(image_queries * args.rounds)
        rows.append(["image→text, --rerank K=50", f"{timed(lambda q: search(home, image=next(it), target='text', k=10, rerank_k=50)):.0f} ms"])
    print(machine())
    print(f"coca_ViT-B-32 (random weights), {args.images} images indexed in {index_s:.0f} s, {args.threads} threads, median of {args.rounds}×{len(queries)}")
    print(f"decoder tokens per image: {store['tokens']} × {store['dim']} float16 = {row_bytes:,} B (against a 512-d vector)")
    print(table(["search, top 10", "latency"], rows))


if __name__ == "__main__":
    main()
