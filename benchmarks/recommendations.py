"""Recommendations measured on Banking77, its intents standing for users' tastes.

    python benchmarks/recommendations.py [--per-intent 10] [--users-per-intent 2] [--liked 3] [--seen 5]

No public ratings set with item texts is available offline, so Banking77 (../shared/datasets/banking77,
its test split) stands in: ``--per-intent`` utterances of each of the 77 intents are the items, each
uploaded as one file to one vector store (all-minilm-l6-v2) through the official ``openai`` client
against ``llmos serve``. A simulated user has one intent: it liked ``--liked`` items of it and has
seen ``--seen`` random items of any intent. POST /v1/vector_stores/{id}/recommendations returns 10
items; a recommended item is relevant when it is of the user's intent. Prints precision@10 and
hit rate@10 (at least one relevant) of the profile (the mean of the liked items), of the last liked
item alone (no profile), and of random unseen items; checks that nothing liked or seen comes back.
Writes a new benchmarks/results/recommendations-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import csv
import io
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

DATA = ROOT.parent / "shared" / "datasets" / "banking77" / "test.csv"
EMBED_MODEL = "all-minilm-l6-v2"
TOP = 10


def items(per_intent: int, rng: random.Random) -> list[tuple[str, str]]:
    """(text, intent) pairs: ``per_intent`` of each intent, drawn with ``rng``."""
    by_intent: dict[str, list[str]] = {}
    with DATA.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_intent.setdefault(row["category"], []).append(row["text"])
    return [(text, intent) for intent in sorted(by_intent) for text in rng.sample(by_intent[intent], per_intent)]


def build_store(client: openai.OpenAI, pairs: list[tuple[str, str]]) -> tuple[str, list[str], float]:
    with ThreadPoolExecutor(8) as pool:
        ids = list(
            pool.map(
                lambda p: client.files.create(file=(f"item{p[0]}.txt", io.BytesIO(p[1][0].encode())),
                                              purpose="assistants").id,
                enumerate(pairs),
            )
        )  # fmt: skip
    store = client.vector_stores.create(name="banking77-items", extra_body={"embedding_model": EMBED_MODEL})
    start = time.perf_counter()
    batch = client.vector_stores.file_batches.create(store.id, file_ids=ids)
    while (
        batch := client.vector_stores.file_batches.retrieve(batch.id, vector_store_id=store.id)
    ).status == "in_progress":
        time.sleep(0.2)
    assert batch.file_counts.completed == len(ids), batch.file_counts
    return store.id, ids, time.perf_counter() - start


def users(intents: list[str], per_intent: int, liked: int, seen: int, rng: random.Random) -> list[dict[str, Any]]:
    out = []
    for intent in sorted(set(intents)):
        own = [i for i, x in enumerate(intents) if x == intent]
        for _ in range(per_intent):
            likes = rng.sample(own, liked)
            others = [i for i in range(len(intents)) if i not in likes]
            out.append({"intent": intent, "liked": likes, "seen": rng.sample(others, seen)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-intent", type=int, default=10)
    parser.add_argument("--users-per-intent", type=int, default=2)
    parser.add_argument("--liked", type=int, default=3)
    parser.add_argument("--seen", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: a new dated one; never replaced)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    pairs = items(args.per_intent, rng)
    intents = [intent for _, intent in pairs]
    people = users(intents, args.users_per_intent, args.liked, args.seen, rng)
    proc, url = start_server(args.home)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)
        store_id, ids, ingest_s = build_store(client, pairs)
        position = {file_id: i for i, file_id in enumerate(ids)}

        def ask(liked: list[int], seen: list[int]) -> tuple[list[int], float]:
            body = {"liked_file_ids": [ids[i] for i in liked], "exclude_file_ids": [ids[i] for i in seen],
                    "max_num_results": TOP}  # fmt: skip
            start = time.perf_counter()
            page: Any = client.post(f"/vector_stores/{store_id}/recommendations", body=body, cast_to=object)
            return [position[item["file_id"]] for item in page["data"]], time.perf_counter() - start

        def score(user: dict[str, Any], got: list[int]) -> tuple[float, float]:
            assert not set(got) & set(user["liked"] + user["seen"]), "a liked or seen item came back"
            relevant = sum(intents[i] == user["intent"] for i in got)
            return relevant / TOP, float(relevant > 0)

        profile, last_only, randomly, latencies = [], [], [], []
        for user in people:
            got, seconds = ask(user["liked"], user["seen"])
            latencies.append(seconds * 1000)
            profile.append(score(user, got))
            alone, _ = ask(user["liked"][-1:], user["seen"] + user["liked"][:-1])
            last_only.append(score(user, alone))
            unseen = [i for i in range(len(ids)) if i not in set(user["liked"] + user["seen"])]
            randomly.append(score(user, rng.sample(unseen, TOP)))
        client.vector_stores.delete(store_id)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    def summary(scores: list[tuple[float, float]]) -> dict[str, float]:
        return {
            "precision@10": sum(p for p, _ in scores) / len(scores),
            "hit_rate@10": sum(h for _, h in scores) / len(scores),
        }

    result = {
        "items": len(ids),
        "intents": len(set(intents)),
        "users": len(people),
        "liked": args.liked,
        "seen": args.seen,
        "embedding_model": EMBED_MODEL,
        "profile": summary(profile),
        "last_liked_only": summary(last_only),
        "random": summary(randomly),
        "latency_p50_ms": percentile(latencies, 0.50),
        "latency_p99_ms": percentile(latencies, 0.99),
        "ingest_s_per_1000_items": ingest_s / len(ids) * 1000,
    }
    print(f"{len(ids)} Banking77 items ({len(set(intents))} intents), {len(people)} users, {EMBED_MODEL}")
    print(f"{'recommender':<16} {'precision@10':>13} {'hit@10':>8}")
    for name in ("profile", "last_liked_only", "random"):
        r = result[name]
        print(f"{name:<16} {r['precision@10']:>13.3f} {r['hit_rate@10']:>8.3f}")  # type: ignore[index]
    print(f"latency p50 {result['latency_p50_ms']:.1f} ms, p99 {result['latency_p99_ms']:.1f} ms (one client)")
    print(f"wrote {write_result('recommendations', result, args.out)}")


if __name__ == "__main__":
    main()
