"""Retrieval: every XQuAD paragraph in one vector store, every question a query.

    python benchmarks/retrieval.py [--questions 1190] [--clients 16] [--qa 0]

Each distinct paragraph of ../shared/datasets/qa_xquad_en/test.jsonl is uploaded as one file and
attached to one store (all-minilm-l6-v2, default chunking) through the official ``openai``
client against ``llmos serve``. Prints recall@1 and recall@5 of the gold paragraph, vector-only
and hybrid (BM25 + vectors, reciprocal-rank fusion, equal weights); search latency p50/p99 with
``--clients`` concurrent clients; ingestion (embedding included) and index rebuild (HNSW and
BM25 from the stored chunks, after the index files are deleted) per 1,000 chunks. With ``--qa N``
it also scores SmolLM2's answers to N questions (exact match and F1, SQuAD's normalisation)
through the Responses API with the file_search tool and without it. Writes a new
benchmarks/results/retrieval-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import re
import shutil
import signal
import string
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import KEY, ROOT, percentile, start_server, write_result

DATA = ROOT.parent / "shared" / "datasets" / "qa_xquad_en" / "test.jsonl"
EMBED_MODEL = "all-minilm-l6-v2"
CHAT_MODEL = "smollm2-135m-instruct"


def load(limit: int) -> tuple[list[str], list[dict[str, Any]]]:
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines() if line.strip()]
    paragraphs = list(dict.fromkeys(r["context"] for r in rows))
    return paragraphs, rows[:limit]


def build_store(
    client: openai.OpenAI, paragraphs: list[str], chunking: dict[str, Any] | None = None
) -> tuple[str, dict[str, int], float]:
    """The store, the paragraph index of each file id, and the seconds from batch to completed
    (``chunking``: the files' ``chunking_strategy``; default: the server's)."""
    with ThreadPoolExecutor(8) as pool:
        ids = list(
            pool.map(
                lambda p: (
                    client.files.create(file=(f"p{p[0]}.txt", io.BytesIO(p[1].encode())), purpose="assistants").id
                ),
                enumerate(paragraphs),
            )
        )
    store = client.vector_stores.create(name="xquad", extra_body={"embedding_model": EMBED_MODEL})
    start = time.perf_counter()
    batch = client.vector_stores.file_batches.create(
        store.id, file_ids=ids, **({"chunking_strategy": chunking} if chunking else {})
    )
    while (
        batch := client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=store.id)
    ).status == "in_progress":
        time.sleep(0.2)
    seconds = time.perf_counter() - start
    assert batch.file_counts.completed == len(ids), batch.file_counts
    return store.id, {file_id: i for i, file_id in enumerate(ids)}, seconds


def recall(
    client: openai.OpenAI,
    store_id: str,
    files: dict[str, int],
    paragraphs: list[str],
    rows: list[dict[str, Any]],
    clients: int,
    hybrid: bool,
) -> dict[str, float]:
    gold = {p: i for i, p in enumerate(paragraphs)}
    options = {"hybrid_search": {"embedding_weight": 1.0, "text_weight": 1.0}} if hybrid else {}

    def one(row: dict[str, Any]) -> tuple[int | None, float]:
        start = time.perf_counter()
        hits = client.vector_stores.search(
            store_id, query=row["question"], max_num_results=5, ranking_options=options
        ).data  # type: ignore[arg-type]
        seconds = time.perf_counter() - start
        ranked = [files[h.file_id] for h in hits]
        target = gold[row["context"]]
        return (ranked.index(target) if target in ranked else None), seconds

    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, rows))
    latencies = [s * 1000 for _, s in results]
    return {
        "recall@1": sum(r == 0 for r, _ in results) / len(results),
        "recall@5": sum(r is not None for r, _ in results) / len(results),
        "latency_p50_ms": percentile(latencies, 0.50),
        "latency_p99_ms": percentile(latencies, 0.99),
    }


def rebuild_seconds(client: openai.OpenAI, home: Path, store_id: str) -> float:
    """One search right after the index files are deleted (it rebuilds them) less a plain search."""

    def timed() -> float:
        start = time.perf_counter()
        client.vector_stores.search(store_id, query="rebuild", max_num_results=1)
        return time.perf_counter() - start

    plain = min(timed() for _ in range(3))
    shutil.rmtree(home / "vector_stores" / store_id)
    return timed() - plain


def _normal(text: str) -> list[str]:
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def em_f1(prediction: str, answers: list[str]) -> tuple[float, float]:
    best_em, best_f1 = 0.0, 0.0
    for answer in answers:
        p, g = _normal(prediction), _normal(answer)
        best_em = max(best_em, float(p == g))
        common = sum((collections.Counter(p) & collections.Counter(g)).values())
        if common:
            precision, rec = common / len(p), common / len(g)
            best_f1 = max(best_f1, 2 * precision * rec / (precision + rec))
    return best_em, best_f1


def answers(client: openai.OpenAI, store_id: str, rows: list[dict[str, Any]], with_search: bool) -> dict[str, float]:
    tools = [{"type": "file_search", "vector_store_ids": [store_id], "max_num_results": 1}] if with_search else []

    def one(row: dict[str, Any]) -> tuple[float, float]:
        response = client.responses.create(
            model=CHAT_MODEL,
            instructions="Answer with a few words only.",
            input=row["question"],
            tools=tools,  # type: ignore[arg-type]
            temperature=0,
            max_output_tokens=24,
            store=False,
        )
        return em_f1(response.output_text.strip(), row["answers"]["text"])

    with ThreadPoolExecutor(8) as pool:
        scores = list(pool.map(one, rows))
    return {"exact_match": sum(e for e, _ in scores) / len(scores), "f1": sum(f for _, f in scores) / len(scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=1190)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--qa", type=int, default=0, help="questions answered by SmolLM2 with and without file_search")
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: a new dated one; never replaced)")
    args = parser.parse_args()
    paragraphs, rows = load(args.questions)
    proc, url = start_server(args.home)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)
        store_id, files, ingest_s = build_store(client, paragraphs)
        chunks = sum(1 for _ in paragraphs)  # one chunk each: every paragraph is under 800 tokens
        result: dict[str, Any] = {
            "paragraphs": len(paragraphs),
            "questions": len(rows),
            "clients": args.clients,
            "ingest_s_per_1000_chunks": ingest_s / chunks * 1000,
            "index_rebuild_s_per_1000_chunks": rebuild_seconds(client, args.home, store_id) / chunks * 1000,
            "vector": recall(client, store_id, files, paragraphs, rows, args.clients, hybrid=False),
            "hybrid": recall(client, store_id, files, paragraphs, rows, args.clients, hybrid=True),
        }
        if args.qa:
            result["qa_with_file_search"] = answers(client, store_id, rows[: args.qa], True)
            result["qa_without_retrieval"] = answers(client, store_id, rows[: args.qa], False)
            result["qa_questions"] = args.qa
        client.vector_stores.delete(store_id)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"{len(paragraphs)} paragraphs, {len(rows)} questions, {EMBED_MODEL}")
    print(f"{'search':<10} {'recall@1':>9} {'recall@5':>9} {'p50 ms':>8} {'p99 ms':>8}  ({args.clients} clients)")
    for name in ("vector", "hybrid"):
        r = result[name]
        print(
            f"{name:<10} {r['recall@1']:>9.3f} {r['recall@5']:>9.3f} "
            f"{r['latency_p50_ms']:>8.1f} {r['latency_p99_ms']:>8.1f}"
        )
    print(f"ingestion (embedding included): {result['ingest_s_per_1000_chunks']:.2f} s per 1,000 chunks")
    print(f"index rebuild from stored chunks: {result['index_rebuild_s_per_1000_chunks']:.3f} s per 1,000 chunks")
    if args.qa:
        for name in ("qa_with_file_search", "qa_without_retrieval"):
            print(f"{name}: EM {result[name]['exact_match']:.3f}  F1 {result[name]['f1']:.3f}")
    print(f"wrote {write_result('retrieval', result, args.out)}")


if __name__ == "__main__":
    main()
