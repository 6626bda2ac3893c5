"""A cross-encoder trained by the platform reranks XQuAD retrieval: recall@1 before and after.

    python benchmarks/rerank_xquad.py [--train-share 0.6] [--negatives 3] [--epochs 1]

Every distinct paragraph of ../shared/datasets/qa_xquad_en/test.jsonl goes into one vector store
(all-minilm-l6-v2), as in benchmarks/retrieval.py. The articles are split in two (by title, in
file order): questions about the first ``--train-share`` of them make the training pairs, each
question with its gold paragraph (label 1) and the ``--negatives`` best other paragraphs of a
vector search (label 0); all-minilm-l6-v2 is fine-tuned on those pairs as a classifier through
the fine-tuning API (a cross-encoder). Each question about the other articles is then searched
twice through the official ``openai`` client: by similarity alone, and reranked by the trained
cross-encoder (``ranking_options.rerank_model``: the best 20 candidates read with the question,
/v1/rerank's scoring path). Prints recall@1 and recall@5 of the gold paragraph both ways, the
training time and the search latency; writes a new benchmarks/results/rerank_xquad-*.json.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import KEY, ROOT, percentile, start_server, write_result
from benchmarks.retrieval import EMBED_MODEL, build_store, load


def split_by_article(rows: list[dict[str, Any]], share: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    titles = list(dict.fromkeys(r["title"] for r in rows))
    trained = set(titles[: round(len(titles) * share)])
    return [r for r in rows if r["title"] in trained], [r for r in rows if r["title"] not in trained]


def search(
    client: openai.OpenAI, store_id: str, files: dict[str, int], question: str, rerank_model: str | None
) -> tuple[list[int], float]:
    """Paragraph indexes of the best 5 hits, and the seconds the search took."""
    options = {"ranking_options": {"rerank_model": rerank_model}} if rerank_model else None
    start = time.perf_counter()
    hits = client.vector_stores.search(store_id, query=question, max_num_results=5, extra_body=options).data
    return [files[h.file_id] for h in hits], time.perf_counter() - start


def training_pairs(
    client: openai.OpenAI,
    store_id: str,
    files: dict[str, int],
    paragraphs: list[str],
    rows: list[dict[str, Any]],
    k: int,
) -> list[dict[str, Any]]:
    gold = {p: i for i, p in enumerate(paragraphs)}
    pairs = []
    for row in rows:
        ranked, _ = search(client, store_id, files, row["question"], None)
        pairs.append({"text": row["question"], "text_pair": row["context"], "label": 1})
        negatives = [i for i in ranked if i != gold[row["context"]]][:k]
        pairs += [{"text": row["question"], "text_pair": paragraphs[i], "label": 0} for i in negatives]
    return pairs


def fine_tune(client: openai.OpenAI, pairs: list[dict[str, Any]], epochs: int, lr: float) -> tuple[str, float]:
    data = "\n".join(json.dumps(p) for p in pairs).encode()
    training = client.files.create(file=("xquad-pairs.jsonl", io.BytesIO(data)), purpose="fine-tune").id
    method = {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {"n_epochs": epochs, "batch_size": 16, "learning_rate_multiplier": lr},
            "adapter": {"type": "full"},
        },
    }
    start = time.perf_counter()
    job = client.fine_tuning.jobs.create(model=EMBED_MODEL, training_file=training, method=method)  # type: ignore[arg-type]
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in {"succeeded", "failed", "cancelled"}:
        time.sleep(5)
    if job.status != "succeeded" or not job.fine_tuned_model:
        raise SystemExit(f"fine-tuning {job.status}: {job.error}")
    return job.fine_tuned_model, time.perf_counter() - start


def evaluate(
    client: openai.OpenAI,
    store_id: str,
    files: dict[str, int],
    paragraphs: list[str],
    rows: list[dict[str, Any]],
    rerank_model: str | None,
) -> dict[str, float]:
    gold = {p: i for i, p in enumerate(paragraphs)}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: search(client, store_id, files, r["question"], rerank_model), rows))
    firsts = [ranked[:1] == [gold[row["context"]]] for (ranked, _), row in zip(results, rows, strict=True)]
    within = [gold[row["context"]] in ranked for (ranked, _), row in zip(results, rows, strict=True)]
    latencies = [seconds * 1000 for _, seconds in results]
    return {
        "recall@1": sum(firsts) / len(rows),
        "recall@5": sum(within) / len(rows),
        "latency_p50_ms": percentile(latencies, 0.50),
        "latency_p99_ms": percentile(latencies, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-share", type=float, default=0.6, help="share of the articles whose questions train")
    parser.add_argument("--negatives", type=int, default=3, help="retrieved wrong paragraphs per training question")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--learning-rate-multiplier", type=float, default=1.0)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-rerank-home")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: a new dated one; never replaced)")
    args = parser.parse_args()
    paragraphs, rows = load(10_000)
    train_rows, test_rows = split_by_article(rows, args.train_share)
    proc, url = start_server(args.home)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=900)
        store_id, files, _ = build_store(client, paragraphs)
        pairs = training_pairs(client, store_id, files, paragraphs, train_rows, args.negatives)
        print(f"{len(pairs)} training pairs from {len(train_rows)} questions; fine-tuning {EMBED_MODEL} ...")
        reranker, train_s = fine_tune(client, pairs, args.epochs, args.learning_rate_multiplier)
        result: dict[str, Any] = {
            "paragraphs": len(paragraphs),
            "train_questions": len(train_rows),
            "test_questions": len(test_rows),
            "training_pairs": len(pairs),
            "epochs": args.epochs,
            "fine_tune_s": train_s,
            "reranker": reranker,
            "vector": evaluate(client, store_id, files, paragraphs, test_rows, None),
            "reranked": evaluate(client, store_id, files, paragraphs, test_rows, reranker),
        }
        client.vector_stores.delete(store_id)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"{len(paragraphs)} paragraphs; {len(test_rows)} held-out questions; fine-tuning took {train_s:.0f} s")
    print(f"{'search':<34} {'recall@1':>9} {'recall@5':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, label in (("vector", EMBED_MODEL), ("reranked", "reranked top 20 (trained here)")):
        r = result[name]
        print(
            f"{label:<34} {r['recall@1']:>9.3f} {r['recall@5']:>9.3f} "
            f"{r['latency_p50_ms']:>8.1f} {r['latency_p99_ms']:>8.1f}"
        )
    print(f"wrote {write_result('rerank_xquad', result, args.out)}")


if __name__ == "__main__":
    main()
