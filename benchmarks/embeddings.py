"""Embeddings: LLM OS's /v1/embeddings against a plain sentence-transformers encode loop, same model, same texts.

    python benchmarks/embeddings.py [--texts 512] [--batches 1 16 64 256] [--clients 16]

Model: all-minilm-l6-v2. Texts: sentences of ../shared/datasets/sst2/test.tsv. For each batch
size, the peer calls ``SentenceTransformer.encode`` on that many texts at a time, in this
process; LLM OS gets one HTTP request per batch, one after another. A last row sends one text
per request from ``--clients`` concurrent clients (what a busy application does), which the
engine embeds together. Vectors are checked against the peer's (cosine). Prints a table and
writes a new benchmarks/results/embeddings-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import KEY, ROOT, PeakRss, start_server, write_result

MODEL = "all-minilm-l6-v2"
TEXTS = ROOT.parent / "shared" / "datasets" / "sst2" / "test.tsv"


def texts(n: int) -> list[str]:
    lines = TEXTS.read_text(encoding="utf-8").splitlines()[1:]
    return [line.rsplit("\t", 1)[0] for line in lines if line.strip()][:n]


def run_peer(model_dir: Path, items: list[str], batch: int) -> tuple[float, list[list[float]]]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    model.encode(items[:batch])  # warm up
    start = time.perf_counter()
    vectors: list[list[float]] = []
    for i in range(0, len(items), batch):
        vectors.extend(model.encode(items[i : i + batch], batch_size=batch).tolist())
    return len(items) / (time.perf_counter() - start), vectors


_client = threading.local()


def embed(url: str, batch: list[str]) -> list[list[float]]:
    """One request, on a kept-alive connection per client thread (as the openai client does)."""
    if not hasattr(_client, "http"):
        _client.http = httpx.Client()
    resp = _client.http.post(
        f"{url}/v1/embeddings",
        json={"model": MODEL, "input": batch},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=300,
    )
    resp.raise_for_status()
    return [d["embedding"] for d in resp.json()["data"]]


def run_llmos(url: str, items: list[str], batch: int, clients: int) -> tuple[float, list[list[float]]]:
    chunks = [items[i : i + batch] for i in range(0, len(items), batch)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda c: embed(url, c), chunks))
    return len(items) / (time.perf_counter() - start), [v for r in results for v in r]


def min_cosine(a: list[list[float]], b: list[list[float]]) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b)).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: a new dated one; never replaced)")
    args = parser.parse_args()
    items = texts(args.texts)

    proc, url = start_server(args.home)
    rows: dict[str, dict[str, Any]] = {}
    ours: dict[int, tuple[float, list[list[float]]]] = {}
    try:
        embed(url, items[:2])  # load the model before timing
        with PeakRss(proc.pid) as rss:
            for batch in args.batches:
                ours[batch] = run_llmos(url, items, batch, clients=1)
            concurrent = run_llmos(url, items, 1, clients=args.clients)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    from llmos.config import Settings
    from llmos.platform import Platform

    platform = Platform.open(Settings(home=args.home))
    model_dir = platform.registry.model_dir(platform.registry.get(MODEL))
    platform.close()
    peer: dict[int, tuple[float, list[list[float]]]] = {b: run_peer(model_dir, items, b) for b in args.batches}

    for batch in args.batches:
        rows[f"{batch} text(s) per call"] = {
            "batch": batch,
            "clients": 1,
            "llmos_texts_per_s": ours[batch][0],
            "sentence_transformers_texts_per_s": peer[batch][0],
            "ratio": ours[batch][0] / peer[batch][0],
            "min_cosine": min_cosine(ours[batch][1], peer[batch][1]),
        }
    rows[f"1 text per call, {args.clients} clients"] = {
        "batch": 1,
        "clients": args.clients,
        "llmos_texts_per_s": concurrent[0],
        "sentence_transformers_texts_per_s": peer[args.batches[0]][0],
        "ratio": concurrent[0] / peer[args.batches[0]][0],
        "min_cosine": min_cosine(concurrent[1], peer[args.batches[0]][1]),
    }
    header = f"{'texts per call':32} {'LLM OS/s':>9} {'ST encode/s':>11} {'ratio':>6} {'min cos':>8}"
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        print(
            f"{name:32} {r['llmos_texts_per_s']:9.1f} {r['sentence_transformers_texts_per_s']:11.1f} "
            f"{r['ratio']:6.2f} {r['min_cosine']:8.5f}"
        )
    print(f"LLM OS server peak RSS: {rss.peak / 2**20:.0f} MB")
    result = {"model": MODEL, "texts": len(items), "rows": rows}
    result["llmos_peak_rss_mb"] = rss.peak / 2**20
    write_result("embeddings", result, args.out)


if __name__ == "__main__":
    main()
