"""A sentiment monitor on LLM OS, with SST-2 standing in for financial news.

    python examples/sentiment_monitor.py --base-url http://127.0.0.1:8000/v1 --api-key KEY

Against a running ``llmos serve`` (an admin key: it creates an alert rule), with the official
``openai`` client only:

1. fine-tunes ``all-minilm-l6-v2`` into a sentiment classifier on ``--train`` SST-2 sentences
   (``--model NAME`` skips this and monitors a classifier you already have);
2. creates a model-output alert rule (``label_drift``, Jensen-Shannon distance >= 0.1) comparing
   the classifier's label shares over the last ``--window`` seconds with the ``--reference``
   seconds before them;
3. classifies a stream of SST-2 dev sentences in their usual mix, a batch every ``--step``
   seconds, each text logged with its label, score and time in a SQLite file (``--log``): the
   application's own record of what it saw;
4. then a burst of negative sentences, until the rule fires (the server evaluates rules every
   ``alert_evaluation_interval_s``, 5 s by default);
5. prints the negative share per ``--step`` from the log. The console's Alerts page draws the same
   shares (from the server's metrics) and shows the rule firing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import openai

SST2 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sst2"
LABELS = {"0": "negative", "1": "positive"}
RULE = "SentimentShift"


def sst2(split: str, directory: Path = SST2) -> list[tuple[str, str]]:
    """(sentence, negative | positive) pairs of an SST-2 split."""
    with (directory / f"{split}.tsv").open(newline="", encoding="utf-8") as f:
        return [(row["sentence"], LABELS[row["label"]]) for row in csv.DictReader(f, delimiter="\t")]


def fine_tune(
    client: openai.OpenAI,
    rows: Sequence[tuple[str, str]],
    *,
    base: str = "all-minilm-l6-v2",
    method: dict[str, Any] | None = None,
    poll_s: float = 2.0,
) -> str:
    """The name of a classifier fine-tuned on ``rows`` (a classification JSONL file)."""
    data = "\n".join(json.dumps({"text": text, "label": label}) for text, label in rows).encode()
    training = client.files.create(file=("sentiment.jsonl", io.BytesIO(data)), purpose="fine-tune")
    method = method or {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}}
    job = client.fine_tuning.jobs.create(
        model=base,
        training_file=training.id,
        suffix="sentiment",
        method=method,  # type: ignore[arg-type]
    )
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(poll_s)
    if job.status != "succeeded" or not job.fine_tuned_model:
        raise SystemExit(f"fine-tuning job {job.id} {job.status}: {job.error}")
    return job.fine_tuned_model


def drift_rule(model: str, *, window_s: float, reference_s: float, min_samples: int) -> dict[str, Any]:
    """The alert rule: the model's label shares moved (Evidently's Jensen-Shannon threshold, 0.1)."""
    return {
        "name": RULE,
        "condition": {
            "kind": "label_drift",
            "model": model,
            "window": f"{window_s:g}s",
            "reference_window": f"{reference_s:g}s",
            "method": "jensenshannon",
            "min_samples": min_samples,
        },
        "op": ">=",
        "threshold": 0.1,
        "severity": "warning",
        "annotations": {"summary": "the labels of {{ $labels.model_name }} moved (distance {{ $value }})"},
    }


def put_rule(client: openai.OpenAI, rule: dict[str, Any]) -> None:
    """Create the rule, or replace one of the same name created earlier."""
    try:
        client.post("/admin/alerts/rules", body=rule, cast_to=object)
    except openai.ConflictError:
        client.put(f"/admin/alerts/rules/{rule['name']}", body=rule, cast_to=object)


def rule_state(client: openai.OpenAI, name: str = RULE) -> dict[str, Any]:
    state: dict[str, Any] = client.get(f"/admin/alerts/rules/{name}", cast_to=object)
    return state


class LabelLog:
    """The application's log of classified texts: time, text, label, score (SQLite)."""

    def __init__(self, path: Path | str) -> None:
        self.db = sqlite3.connect(path)
        self.db.execute("CREATE TABLE IF NOT EXISTS seen (at REAL, text TEXT, label TEXT, score REAL)")

    def record(self, at: float, texts: Sequence[str], results: Iterable[dict[str, Any]]) -> None:
        with self.db:
            self.db.executemany(
                "INSERT INTO seen VALUES (?, ?, ?, ?)",
                [(at, text, r["label"], r["score"]) for text, r in zip(texts, results, strict=True)],
            )

    def shares(self, label: str, bucket_s: float) -> list[tuple[float, float, int]]:
        """(bucket start, share of ``label``, texts) for every ``bucket_s`` that saw a text."""
        rows = self.db.execute(
            "SELECT CAST(at / ? AS INTEGER) AS bucket, AVG(label = ?), COUNT(*) FROM seen "
            "GROUP BY bucket ORDER BY bucket",
            (bucket_s, label),
        )
        return [(bucket * bucket_s, share, count) for bucket, share, count in rows]

    def close(self) -> None:
        self.db.close()


def classify(client: openai.OpenAI, model: str, texts: Sequence[str], log: LabelLog, at: float) -> list[str]:
    """Classify ``texts`` now, log them, and return their labels."""
    page: dict[str, Any] = client.post("/classifications", body={"model": model, "input": list(texts)}, cast_to=object)
    log.record(at, texts, page["data"])
    return [r["label"] for r in page["data"]]


def usual_mix(rows: Sequence[tuple[str, str]], size: int, rng: random.Random) -> list[str]:
    return [text for text, _ in rng.sample(list(rows), size)]


def negatives(rows: Sequence[tuple[str, str]], size: int, rng: random.Random) -> list[str]:
    return rng.sample([text for text, label in rows if label == "negative"], size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", required=True)
    parser.add_argument("--model", help="a sentiment classifier to monitor (default: fine-tune one now)")
    parser.add_argument("--train", type=int, default=2000, help="SST-2 sentences to fine-tune on")
    parser.add_argument("--window", type=float, default=30.0, help="seconds of the current window")
    parser.add_argument("--reference", type=float, default=60.0, help="seconds of the reference window")
    parser.add_argument("--step", type=float, default=5.0, help="seconds between batches")
    parser.add_argument("--batch", type=int, default=16, help="texts per batch")
    parser.add_argument("--log", type=Path, default=Path("sentiment-log.sqlite"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)  # noqa: S311  (which sentences are sent, not a secret)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, timeout=600)
    model = args.model or fine_tune(client, rng.sample(sst2("train"), args.train))
    print(f"monitoring {model}")
    put_rule(client, drift_rule(model, window_s=args.window, reference_s=args.reference, min_samples=args.batch * 2))
    stream, log = sst2("dev"), LabelLog(args.log)
    start = time.time()
    while time.time() - start < args.reference + args.window:  # the usual mix fills both windows
        classify(client, model, usual_mix(stream, args.batch, rng), log, time.time())
        time.sleep(args.step)
    print("burst of negative sentences")
    deadline = time.time() + args.window * 4
    while (state := rule_state(client))["state"] != "firing" and time.time() < deadline:
        classify(client, model, negatives(stream, args.batch, rng), log, time.time())
        time.sleep(args.step)
    print(f"rule {RULE}: {state['state']} {[a.get('value') for a in state.get('alerts', [])]}")
    for at, share, count in log.shares("negative", args.step):
        print(f"{time.strftime('%H:%M:%S', time.localtime(at))}  negative {share:5.0%}  of {count}")
    log.close()


if __name__ == "__main__":
    main()
