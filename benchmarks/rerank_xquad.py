"""A cross-encoder trained by the platform reranks XQuAD retrieval: recall@1 before and after.

    python benchmarks/rerank_xquad.py [--train-share 0.6] [--validation-articles 5] [--negatives 2]
        [--epochs 3] [--learning-rate-multiplier 4] [--pooling mean] [--test-questions N]
        [--rerank-model NAME]

Every distinct paragraph of ../shared/datasets/qa_xquad_en/test.jsonl goes into one vector store
(all-minilm-l6-v2), as in benchmarks/retrieval.py, in chunks of at most 350 words (3 of the 240
paragraphs become two chunks): the server's cross-encoder refuses a (question, chunk) pair longer
than its 512 positions rather than read part of it, and the longest paragraph has 619 of its tokens.

The articles are split three ways (by title, in file order): the first ``--train-share`` of them
are the training articles, the last ``--validation-articles`` of which are kept out of training to
choose the number of epochs; the other articles are the test set. Each question about a training
article makes the training pairs: its gold paragraph (label 1) and ``--negatives``
other paragraphs of its vector search's top 20, the candidates a reranker orders (the best ranked
one, then others drawn at random; label 0), with the gold pair repeated as often so that both labels
are equally frequent (at 1 to 3 the model stayed at always answering 0). all-minilm-l6-v2 is
fine-tuned on those pairs as a classifier through the fine-tuning API (a cross-encoder: question and
paragraph read as one input, full fine-tuning with a warm-up, batches grouped by length), its head
over the mean of the token states (``--pooling mean``, the pooling the base was trained with; over
``[CLS]``, the head stayed at chance for about 60 steps: docs/performance.md, Reranking). One job
trains ``--epochs`` epochs; each epoch's checkpoint is served as a model of its own
(``<model>:ckpt-step-N``), and every validation question is reranked by each of them. The
checkpoint with the best validation recall@1 (the earliest of equals) is the reranker; the test
questions (``--test-questions`` of them, evenly spaced, or all) are searched only then, once,
through the official ``openai`` client: by similarity alone, and reranked by that checkpoint
(``ranking_options.rerank_model``: the best 20 candidates read with the question, /v1/rerank's
scoring path). ``--rerank-model`` names a served model to rerank with instead of training one (a
chat model reranks by the yes/no prompt of docs/api.md; no validation then). Prints recall@1 and
recall@5 of the gold paragraph both ways and the exact McNemar test of their difference, the
training time and the search latency; writes a new benchmarks/results/rerank_xquad-*.json.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
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
from llmos.api.openai.vector_stores.serving import RERANK_DEPTH

CHUNKING = {"type": "static", "static": {"max_chunk_size_tokens": 350, "chunk_overlap_tokens": 100}}
TRAINING = {
    "batch_size": 16,
    "warmup_ratio": 0.1,
    "max_seq_length": 384,  # with its question, every paragraph but the 3 longest is read whole
}


def split_by_article(
    rows: list[dict[str, Any]], share: float, validation_articles: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Training, validation and test rows, no article in two of them: the first ``share`` of the
    articles (in file order) less their last ``validation_articles`` train, those choose the
    epochs, the rest test (the same test articles whatever ``validation_articles`` is)."""
    titles = list(dict.fromkeys(r["title"] for r in rows))
    cut = round(len(titles) * share)
    if not 0 < validation_articles < cut or cut == len(titles):
        raise SystemExit(f"{len(titles)} articles: {cut} for training cannot keep {validation_articles} to validate")
    part = {t: 0 for t in titles[: cut - validation_articles]} | {t: 1 for t in titles[cut - validation_articles : cut]}
    split: tuple[list[dict[str, Any]], ...] = ([], [], [])
    for row in rows:
        split[part.get(row["title"], 2)].append(row)
    return split[0], split[1], split[2]


def mcnemar_p(gained: int, lost: int) -> float:
    """Exact two-sided McNemar test: the chance of a split of the discordant pairs at least this
    uneven if either order were as likely to win each of them."""
    n = gained + lost
    tail = sum(math.comb(n, i) for i in range(min(gained, lost) + 1)) / 2**n
    return min(1.0, 2 * tail)


def evenly(rows: list[dict[str, Any]], count: int | None) -> list[dict[str, Any]]:
    """``count`` of ``rows`` spread over all of them (every article keeps its share), or all."""
    if count is None or count >= len(rows):
        return rows
    return [rows[i * len(rows) // count] for i in range(count)]


def search(
    client: openai.OpenAI, store_id: str, files: dict[str, int], question: str, rerank_model: str | None, k: int = 5
) -> tuple[list[int], float]:
    """Paragraph indexes of the best ``k`` hits (a paragraph once, at its best chunk), and the
    seconds the search took."""
    options = {"ranking_options": {"rerank_model": rerank_model}} if rerank_model else None
    start = time.perf_counter()
    hits = client.vector_stores.search(store_id, query=question, max_num_results=k, extra_body=options).data
    return list(dict.fromkeys(files[h.file_id] for h in hits)), time.perf_counter() - start


def training_pairs(
    client: openai.OpenAI,
    store_id: str,
    files: dict[str, int],
    paragraphs: list[str],
    rows: list[dict[str, Any]],
    k: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Per question, ``k`` wrong paragraphs of its top 20 (the best ranked, then drawn at random)
    and its gold paragraph ``k`` times: hard negatives, both labels equally frequent."""
    gold = {p: i for i, p in enumerate(paragraphs)}
    draw = random.Random(seed)
    pairs = []
    for row in rows:
        ranked, _ = search(client, store_id, files, row["question"], None, RERANK_DEPTH)
        wrong = [i for i in ranked if i != gold[row["context"]]]
        negatives = wrong[:1] + draw.sample(wrong[1:], max(0, min(k - 1, len(wrong) - 1)))
        pairs += [{"text": row["question"], "text_pair": row["context"], "label": 1}] * len(negatives)
        pairs += [{"text": row["question"], "text_pair": paragraphs[i], "label": 0} for i in negatives]
    return pairs


def fine_tune(
    client: openai.OpenAI, pairs: list[dict[str, Any]], epochs: int, lr: float, pooling: str
) -> tuple[list[str], float, list[Any]]:
    """Each epoch's checkpoint model, in order, the seconds training took and its training metrics."""
    data = "\n".join(json.dumps(p) for p in pairs).encode()
    training = client.files.create(file=("xquad-pairs.jsonl", io.BytesIO(data)), purpose="fine-tune").id
    method = {
        "type": "supervised",
        "supervised": {
            "hyperparameters": {
                "n_epochs": epochs,
                "batch_size": TRAINING["batch_size"],
                "learning_rate_multiplier": lr,
            },
            "adapter": {"type": "full"},
            "warmup_ratio": TRAINING["warmup_ratio"],
            "max_seq_length": TRAINING["max_seq_length"],
            "group_by_length": True,
            "pooling": pooling,
        },
    }
    start = time.perf_counter()
    job = client.fine_tuning.jobs.create(model=EMBED_MODEL, training_file=training, method=method)  # type: ignore[arg-type]
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in {"succeeded", "failed", "cancelled"}:
        time.sleep(5)
    seconds = time.perf_counter() - start
    if job.status != "succeeded" or not job.fine_tuned_model:
        raise SystemExit(f"fine-tuning {job.status}: {job.error}")
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data  # newest first
    checkpoints = sorted(client.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data, key=lambda c: c.step_number)
    if len(checkpoints) != epochs:
        raise SystemExit(f"{epochs} epochs left {len(checkpoints)} checkpoints")
    models = [c.fine_tuned_model_checkpoint for c in checkpoints]
    return models, seconds, [e.data for e in reversed(events) if e.type == "metrics"]


def evaluate(
    client: openai.OpenAI,
    store_id: str,
    files: dict[str, int],
    paragraphs: list[str],
    rows: list[dict[str, Any]],
    rerank_model: str | None,
) -> dict[str, Any]:
    """Recall@1 and @5 of the gold paragraph, latency, and whether each question's came first."""
    gold = {p: i for i, p in enumerate(paragraphs)}
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda r: search(client, store_id, files, r["question"], rerank_model), rows))
    firsts = [ranked[:1] == [gold[row["context"]]] for (ranked, _), row in zip(results, rows, strict=True)]
    within = [gold[row["context"]] in ranked for (ranked, _), row in zip(results, rows, strict=True)]
    latencies = [seconds * 1000 for _, seconds in results]
    return {
        "first": firsts,
        "recall@1": sum(firsts) / len(rows),
        "recall@5": sum(within) / len(rows),
        "latency_p50_ms": percentile(latencies, 0.50),
        "latency_p99_ms": percentile(latencies, 0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-share", type=float, default=0.6, help="share of the articles whose questions train")
    parser.add_argument(
        "--validation-articles", type=int, default=5, help="of the training articles, kept out to choose the epochs"
    )
    parser.add_argument("--negatives", type=int, default=2, help="wrong paragraphs of the top 20 per training question")
    parser.add_argument("--epochs", type=int, default=3, help="the most epochs; each epoch's checkpoint is a candidate")
    parser.add_argument("--learning-rate-multiplier", type=float, default=4.0, help="of full fine-tuning's 2e-5")
    parser.add_argument("--pooling", choices=["mean", "cls"], default="mean", help="what the classifier head reads")
    parser.add_argument("--test-questions", type=int, default=None, help="held-out questions searched (default all)")
    parser.add_argument("--rerank-model", default=None, help="a served model to rerank with; nothing is trained")
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-rerank-home")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: a new dated one; never replaced)")
    args = parser.parse_args()
    paragraphs, rows = load(10_000)
    train_rows, validation_rows, test_rows = split_by_article(rows, args.train_share, args.validation_articles)
    test_rows = evenly(test_rows, args.test_questions)
    # A model trained here is in --home already; a catalog model to rerank with is pulled at start.
    pulled = [EMBED_MODEL, *([args.rerank_model] if args.rerank_model and ":" not in args.rerank_model else [])]
    proc, url = start_server(args.home, {"LLMOS_DEFAULT_MODELS": json.dumps(pulled)})
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=900)
        store_id, files, _ = build_store(client, paragraphs, CHUNKING)
        result: dict[str, Any] = {
            "paragraphs": len(paragraphs),
            "chunking": CHUNKING,
            "test_questions": len(test_rows),
        }
        reranker = args.rerank_model
        if reranker is None:
            pairs = training_pairs(client, store_id, files, paragraphs, train_rows, args.negatives)
            print(f"{len(pairs)} training pairs from {len(train_rows)} questions; fine-tuning {EMBED_MODEL} ...")
            checkpoints, train_s, curve = fine_tune(
                client, pairs, args.epochs, args.learning_rate_multiplier, args.pooling
            )
            print(f"trained {len(checkpoints)} epochs in {train_s:.0f} s; last training metrics: {curve[-1:]}")
            # The epochs are chosen on the validation articles alone; the test set is searched after.
            validation = [evaluate(client, store_id, files, paragraphs, validation_rows, None)]
            validation += [evaluate(client, store_id, files, paragraphs, validation_rows, m) for m in checkpoints]
            for v in validation:
                del v["first"]
            recalls = [v["recall@1"] for v in validation[1:]]
            chosen = recalls.index(max(recalls))
            reranker = checkpoints[chosen]
            print(f"validation recall@1 by epoch {recalls} (vectors alone {validation[0]['recall@1']:.3f})")
            print(f"chosen: epoch {chosen + 1}, {reranker}")
            result |= {
                "train_questions": len(train_rows),
                "validation_questions": len(validation_rows),
                "validation_articles": args.validation_articles,
                "validation": {
                    "vector": validation[0],
                    "epochs": {str(epoch): v for epoch, v in enumerate(validation[1:], 1)},
                },
                "chosen_epoch": chosen + 1,
                "training_pairs": len(pairs),
                "negatives_per_question": args.negatives,
                "epochs_tried": list(range(1, args.epochs + 1)),
                "learning_rate_multiplier": args.learning_rate_multiplier,
                "pooling": args.pooling,
                **TRAINING,
                "fine_tune_s": train_s,
                "training_metrics": curve,
            }
        result["reranker"] = reranker
        vector = evaluate(client, store_id, files, paragraphs, test_rows, None)
        reranked = evaluate(client, store_id, files, paragraphs, test_rows, reranker)
        # Paired: the questions reranking put first that similarity did not, and the reverse.
        both = list(zip(vector.pop("first"), reranked.pop("first"), strict=True))
        gained, lost = sum(r and not v for v, r in both), sum(v and not r for v, r in both)
        result |= {
            "vector": vector,
            "reranked": reranked,
            "first_only_after_reranking": gained,
            "first_only_by_similarity": lost,
            "mcnemar_exact_p": mcnemar_p(gained, lost),
        }
        client.vector_stores.delete(store_id)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    print(f"{len(paragraphs)} paragraphs; {len(test_rows)} held-out questions")
    print(f"{'search':<34} {'recall@1':>9} {'recall@5':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for name, label in (("vector", EMBED_MODEL), ("reranked", f"reranked top {RERANK_DEPTH}")):
        r = result[name]
        print(
            f"{label:<34} {r['recall@1']:>9.3f} {r['recall@5']:>9.3f} "
            f"{r['latency_p50_ms']:>8.1f} {r['latency_p99_ms']:>8.1f}"
        )
    print(
        f"first only after reranking: {result['first_only_after_reranking']}; "
        f"first only by similarity: {result['first_only_by_similarity']}; "
        f"exact McNemar p = {result['mcnemar_exact_p']:.3f}"
    )
    write_result("rerank_xquad", result, args.out)


if __name__ == "__main__":
    main()
