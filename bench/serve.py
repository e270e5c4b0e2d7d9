"""`mmsearch serve`: warm query latency over HTTP, and `mmsearch search` wall time with and without a server.

For each size (10k and 100k images by default) a home is filled directly
through the catalog's bulk insert with CLIP-like unit vectors (no image is
encoded; every row is a hard link to one of a few real JPEGs, so paths exist
and thumbnails work, and rows share those files' content hashes, so the
re-ranker's token store holds one row per file). The model is ViT-B-32 with
random weights in local-dir layout, with an untrained re-ranker beside it
(its correction is zero, its cost is real). Then a real `mmsearch serve`
process answers, on loopback only:

- text queries (`GET /api/search`, the text encoded per request), image
  queries (`POST /api/search` with a 640x480 JPEG), and text queries
  re-ranked (`rerank=1`, 50 candidates), each from 1 client and from 8
  concurrent clients (keep-alive connections, a bounded number of requests);
- `mmsearch search` as a subprocess, several runs with the server up (warm)
  and then with it stopped (cold, in-process), medians compared.

The machine may be shared: all figures of one run are taken side by side.

    python bench/serve.py                       # 10k and 100k, ~5-8 min on 2 cores
    python bench/serve.py --sizes 10000 --requests 20
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import numpy as np

from _common import ROOT, clustered_vectors, machine, percentiles, photo, table, vit_b32_dir

TEXTS = ["a dog running on the beach", "red car", "two people at a wedding", "snowy mountains at sunset",
         "a bowl of soup", "city street at night", "a cat asleep on a sofa", "children playing football"]
FILES = 16


def with_reranker(model: Path, folder: Path) -> Path:
    """The random ViT-B-32 folder plus an untrained re-ranker (links to the weights, no copy)."""
    import torch

    from mmsearch.rerank import CrossAttentionScorer, save_scorer

    folder.mkdir(parents=True, exist_ok=True)
    for entry in model.iterdir():
        target = folder / entry.name
        if not target.exists():
            os.symlink(entry, target)
    torch.manual_seed(0)
    save_scorer(CrossAttentionScorer(512), folder)
    return folder


def encode_alone(model: Path, runs: int) -> tuple[float, float]:
    """p50/p95 (ms) of encoding one text query in this process on one thread: the floor of a text query.

    At the text precision the server has (``MMSEARCH_TEXT_PRECISION``, else auto).
    """
    from mmsearch.encode import load_encoder
    from mmsearch.runtime import set_torch_threads
    from mmsearch.settings import resolve

    set_torch_threads(1)
    encoder = load_encoder(str(model), text_precision=resolve().text_precision)
    encoder.embed_texts([TEXTS[0]])
    times = []
    for i in range(runs):
        started = time.perf_counter()
        encoder.embed_texts([TEXTS[i % len(TEXTS)]])
        times.append(time.perf_counter() - started)
    return percentiles(times)


def file_tokens(model: Path, files: list[Path]) -> tuple[list[str], np.ndarray]:
    """Content hashes of ``files`` and their re-ranker patch tokens (what indexing would store)."""
    import torch

    from mmsearch.decode import content_hash, load_image
    from mmsearch.encode import load_encoder
    from mmsearch.towers import image_token_states

    encoder = load_encoder(str(model))
    pixels = torch.stack([encoder.preprocess(load_image(str(p), 224)) for p in files])
    with torch.inference_mode():
        _, tokens = image_token_states(encoder.model, pixels)
    return [content_hash(p.read_bytes()) for p in files], tokens.to(torch.float16).numpy()


def fill_home(home: Path, model: Path, count: int, files: list[Path], hashes: list[str], tokens: np.ndarray,
              links: Path) -> None:
    """A catalog of ``count`` rows of unit vectors, each a hard link to one of ``files``; their tokens stored."""
    from mmsearch.home import Home
    from mmsearch.rerank import TokenStore
    from mmsearch.settings import resolve

    settings = resolve(home=home, model=str(model))
    links.mkdir(parents=True, exist_ok=True)
    vectors = clustered_vectors(count, 512, seed=count)
    with Home.open(settings) as h:
        h.catalog.set_meta({"model": h.spec.canonical, "dim": "512"})
        step = 20_000
        for start in range(0, count, step):
            rows = []
            for i in range(start, min(count, start + step)):
                src = files[i % len(files)]
                path = links / f"{i // 1000:03d}" / f"img_{i:06d}.jpg"
                path.parent.mkdir(exist_ok=True)
                os.link(src, path)
                st = path.stat()
                rows.append({"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                             "content_hash": hashes[i % len(files)], "width": 640, "height": 480,
                             "vector": vectors[i]})
            h.catalog.write_images(rows, [])
        store = TokenStore.open(home, h.spec.canonical, (int(tokens.shape[1]), int(tokens.shape[2])))
        store.add(hashes, tokens)
        h.index("image")  # built and saved now, not by the server's first query


def start_server(home: Path) -> tuple[subprocess.Popen, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mmsearch", "--home", str(home), "serve", "--port", "0"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    record_path = home / "serve.json"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve exited: {proc.stderr.read()}")
        if record_path.exists():
            record = json.loads(record_path.read_text())
            try:
                conn = http.client.HTTPConnection("127.0.0.1", record["port"], timeout=5)
                conn.request("GET", "/api/info")
                if conn.getresponse().status == 200:
                    return proc, record
            except OSError:
                pass
        time.sleep(0.5)
    raise SystemExit("serve did not start in 5 minutes")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def multipart(image: bytes) -> tuple[bytes, str]:
    boundary = "mmsearchbench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def one_request(conn: http.client.HTTPConnection, kind: str, i: int, image: bytes) -> float:
    started = time.perf_counter()
    if kind == "image":
        body, ctype = multipart(image)
        conn.request("POST", "/api/search", body=body, headers={"Content-Type": ctype})
    else:
        params = {"q": TEXTS[i % len(TEXTS)], "k": 10, "rerank": int(kind == "text+rerank")}
        conn.request("GET", "/api/search?" + urllib.parse.urlencode(params))
    response = conn.getresponse()
    payload = response.read()
    if response.status != 200:
        raise SystemExit(f"{kind}: HTTP {response.status}: {payload[:200]!r}")
    return time.perf_counter() - started


def load(port: int, kind: str, clients: int, per_client: int, image: bytes) -> tuple[list[float], float]:
    """Latencies of ``clients`` threads making ``per_client`` requests each, and the wall time."""
    latencies: list[float] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            one_request(conn, kind, n, image)  # a warm-up per connection, not counted
            for i in range(per_client):
                took = one_request(conn, kind, n * per_client + i, image)
                with lock:
                    latencies.append(took)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return latencies, time.perf_counter() - started


def cli_wall(home: Path, runs: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    times = []
    for i in range(runs):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mmsearch", "--home", str(home), "search", TEXTS[i % len(TEXTS)]],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--requests", type=int, default=40, help="requests per row for 1 client (8 clients: 5 each)")
    parser.add_argument("--image-requests", type=int, default=12, help="the same, for image queries")
    parser.add_argument("--cli-runs", type=int, default=5)
    parser.add_argument("--cold-runs", type=int, default=3)
    args = parser.parse_args()
    print(machine())
    tmp = Path(tempfile.mkdtemp(prefix="mmsearch-bench-serve-"))
    try:
        model = with_reranker(vit_b32_dir(), tmp / "model")
        files = []
        for i in range(FILES):
            path = tmp / "files" / f"f{i:02d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            photo(i, (640, 480)).save(path, "JPEG", quality=90)
            files.append(path)
        query_image = io.BytesIO()
        photo(999, (640, 480)).save(query_image, "JPEG", quality=90)
        image = query_image.getvalue()
        hashes, tokens = file_tokens(model, files)
        rows, cli_rows = [], []
        for size in args.sizes:
            home = tmp / f"home-{size}"
            started = time.perf_counter()
            fill_home(home, model, size, files, hashes, tokens, tmp / f"links-{size}")
            print(f"{size} rows filled in {time.perf_counter() - started:.1f} s", flush=True)
            index_type = json.loads((home / "images.faiss.json").read_text())["index_type"]
            proc, record = start_server(home)
            try:
                port = int(record["port"])
                for kind in ("text", "image", "text+rerank"):
                    n = args.image_requests if kind == "image" else args.requests
                    for clients in (1, 8):
                        lat, wall = load(port, kind, clients, max(1, n // clients), image)
                        p50, p95 = percentiles(lat)
                        rows.append([size, index_type, kind, clients, len(lat), f"{p50:.1f}", f"{p95:.1f}",
                                     f"{len(lat) / wall:.1f}"])
                        print(" | ".join(map(str, rows[-1])), flush=True)
                warm = cli_wall(home, args.cli_runs)
                p50, p95 = encode_alone(model, args.requests)  # the server idle, as it was for 1 client
                rows.append([size, "-", "text encode alone, in-process", 1, args.requests, f"{p50:.1f}", f"{p95:.1f}", "-"])
                print(" | ".join(map(str, rows[-1])), flush=True)
            finally:
                stop_server(proc)
            cold = cli_wall(home, args.cold_runs)
            cli_rows.append([size, f"{statistics.median(cold):.2f}", f"{statistics.median(warm):.3f}",
                             f"{statistics.median(cold) / statistics.median(warm):.1f}x",
                             " ".join(f"{t:.2f}" for t in cold), " ".join(f"{t:.3f}" for t in warm)])
            shutil.rmtree(tmp / f"links-{size}", ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)
        print()
        print("HTTP latency per request (ms), ViT-B-32 random weights, k=10, loopback")
        print(table(["images", "index", "query", "clients", "requests", "p50 ms", "p95 ms", "req/s"], rows))
        print()
        print("`mmsearch search TEXT` wall time (s), subprocess, medians")
        print(table(["images", "cold (no server)", "warm (server)", "speed-up", "cold runs", "warm runs"], cli_rows))
        text_100k = [r for r in rows if r[2] == "text" and r[3] == 1]
        if text_100k:
            print(f"\nwarm text query p50 at {text_100k[-1][0]} images: {text_100k[-1][5]} ms; "
                  f"CLI speed-up with a server: {cli_rows[-1][3]}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
