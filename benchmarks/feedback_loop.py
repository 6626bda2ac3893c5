"""The loop of issue 18, measured end to end through the official ``openai`` client against ``llmos serve``:

    python benchmarks/feedback_loop.py --model-dir DIR [--train 1600] [--held-out 400] [--epochs 1]

1. SmolLM2-135M-Instruct, behind ``sst2-bot@production``, answers ``--train`` SST-2 train
   sentences framed as chat, with ``store: true`` (each from one of 50 end users);
2. a simulated user, knowing the labels, rates each answer up when its label is right and down
   with a correction (the answer with the right label) otherwise;
3. the feedback is exported as an SFT file and a LoRA fine-tune runs on it;
4. an eval (string check: the answer's label equals the item's) runs the fine-tuned model and
   the one behind ``@production`` over the first ``--held-out`` SST-2 test sentences;
5. the promotion is asked for with the two runs: it succeeds only if the candidate is better;
   ``sst2-bot@production`` then answers with the new version;
6. a 10% canary of the old version and two rollbacks (the canary ends; production returns to the
   base) behave as configured.

Every answer, in the answering stage and in both eval runs, is constrained by the same
``response_format`` (a JSON object whose one field is one of the two labels): unconstrained,
SmolLM2 begins "The sentiment of...", so a short answer rarely holds the label and the zero-shot
figure measured the answer's wording, not the model's judgement. Constrained, greedy decoding
takes the label whose first token the model finds likelier there, for the base and the
fine-tuned model alike, and the label is read from the JSON, not guessed from free text. The
constraint is ``response_format`` rather than the ``structured_outputs`` choice extra because
an eval run's ``sampling_params`` take OpenAI's fields only, and every stage must ask the same
question.

``DIR`` is SmolLM2-135M-Instruct as safetensors (as benchmarks/dpo_hh.py takes it). Prints each stage's time and the
accuracies with the interval of their difference; writes benchmarks/results/feedback_loop-*.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.finetune_chat_sst2 import LABELS, PROMPT, sentences
from benchmarks.harness import KEY, ROOT, start_server, write_result

SST2 = ROOT.parent / "shared" / "datasets" / "sst2"
LINE = "sst2-bot"
PRODUCTION = f"{LINE}@production"
BASE = "smollm2"
TENANT = "shop"
"""The application's tenant. It owns the ``sst2-bot`` line, its feedback and its fine-tunes: an
admin's alias of a shared model would make a shared line, which may point only to shared models."""
TENANT_SCOPES = ["inference", "files", "fine-tune", "models"]
USERS = 50
ANSWER_FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "sentiment",
        "strict": True,
        "schema": {
            "type": "object",
            "properties": {"sentiment": {"type": "string", "enum": list(LABELS)}},
            "required": ["sentiment"],
            "additionalProperties": False,
        },
    },
}
"""Every answer's shape: ``{"sentiment":"positive"}`` (the server writes compact JSON)."""
ANSWER_TOKENS = 16
"""Room for the whole object (about ten tokens), so no answer is cut short."""


def poll(read: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + 3 * 3600
    while True:
        state = read()
        if done(state):
            return state
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not finish: {state}")
        time.sleep(1)


def call(http: httpx.Client, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    answer = http.request(method, path, json=body)
    if not answer.is_success:
        raise SystemExit(f"{method} {path} answered {answer.status_code}: {answer.text}")
    result: dict[str, Any] = answer.json()
    return result


def answered_label(answer: str) -> str | None:
    """The label of an answer in ``ANSWER_FORMAT``; None if it is not one (cut short, say)."""
    try:
        parsed = json.loads(answer)
    except ValueError:
        return None
    label = parsed.get("sentiment") if isinstance(parsed, dict) else None
    return label if label in LABELS else None


def labelled(label: int) -> str:
    """The answer in ``ANSWER_FORMAT`` that holds ``label``, as compact as the server writes it."""
    return json.dumps({"sentiment": LABELS[label]}, separators=(",", ":"))


def ask(client: openai.OpenAI, items: list[tuple[str, int]], tag: str, workers: int) -> list[tuple[str, str, int]]:
    """Each sentence asked of production by one of the end users: (completion id, answer, label)."""

    def one(k: int) -> tuple[str, str, int]:
        text, label = items[k]
        answer = client.chat.completions.create(
            model=PRODUCTION,
            messages=[{"role": "user", "content": PROMPT.format(text=text)}],
            max_tokens=ANSWER_TOKENS,
            temperature=0,
            response_format=ANSWER_FORMAT,
            store=True,
            metadata={"loop": tag},
            user=f"user-{k % USERS}",
        )
        return answer.id, answer.choices[0].message.content or "", label

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(len(items))))


def give_feedback(http: httpx.Client, answers: list[tuple[str, str, int]], workers: int) -> int:
    """Up when the answer's label is right; down with the right answer as the correction otherwise."""

    def one(entry: tuple[str, str, int]) -> bool:
        completion_id, answer, label = entry
        right = answered_label(answer) == LABELS[label]
        body = {"rating": "up"} if right else {"rating": "down", "correction": labelled(label)}
        call(http, "POST", f"/v1/chat/completions/{completion_id}/feedback", {**body, "tags": ["simulated"]})
        return right

    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, answers))


def eval_run(http: httpx.Client, eval_id: str, model: str, items: list[tuple[str, int]]) -> dict[str, Any]:
    source = {
        "type": "completions",
        "model": model,
        "input_messages": {
            "type": "template",
            "template": [{"role": "user", "content": PROMPT.format(text="{{item.text}}")}],
        },
        "sampling_params": {
            "max_completion_tokens": ANSWER_TOKENS,
            "temperature": 0,
            "response_format": ANSWER_FORMAT,
        },
        "source": {
            "type": "file_content",
            "content": [{"item": {"text": text, "label": LABELS[label]}} for text, label in items],
        },
    }
    run = call(http, "POST", f"/v1/evals/{eval_id}/runs", {"name": model, "data_source": source})
    path = f"/v1/evals/{eval_id}/runs/{run['id']}"
    return poll(lambda: call(http, "GET", path), lambda r: r["status"] in ("completed", "failed", "canceled"), path)


def accuracy(run: dict[str, Any]) -> float:
    counts = run["result_counts"]
    return float(counts["passed"]) / max(1, counts["total"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="SmolLM2-135M-Instruct (safetensors)")
    parser.add_argument("--train", type=int, default=1600, help="SST-2 train sentences users ask about")
    parser.add_argument("--held-out", type=int, default=400, help="SST-2 test sentences the eval runs on")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--workers", type=int, default=8, help="concurrent client requests")
    args = parser.parse_args()

    train = sentences(SST2 / "train.tsv")[: args.train]
    held_out = sentences(SST2 / "test.tsv")[: args.held_out]
    stages: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str, since: float) -> float:
        now = time.perf_counter()
        stages[name] = now - since
        print(f"{name}: {stages[name]:.0f} s", flush=True)
        return now

    with tempfile.TemporaryDirectory() as home:
        server, url = start_server(Path(home), {"LLMOS_EVAL_CONCURRENCY": str(args.workers)})
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)
            http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)
            mark = stage("server start", started)
            pull = call(http, "POST", "/v1/model_pulls", {"model": f"file:{args.model_dir.resolve()}", "name": BASE})
            pull_path = f"/v1/model_pulls/{pull['id']}"
            poll(lambda: call(http, "GET", pull_path), lambda p: p["status"] != "running", "the pull")
            call(http, "POST", "/v1/admin/tenants", {"id": TENANT})
            scopes = {"name": "sst2-app", "tenant": TENANT, "scopes": TENANT_SCOPES}
            secret = call(http, "POST", "/v1/admin/keys", scopes)["key"]
            # Everything after the pull is the tenant's own: the shared base, its line and its loop.
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0, timeout=600)
            http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret}"}, timeout=600)
            call(http, "POST", "/v1/model_aliases", {"model": LINE, "alias": "production", "target": BASE})
            mark = stage("model registered, production set", mark)

            answers = ask(client, train, "sst2-loop", args.workers)
            mark = stage(f"{len(answers)} chat answers stored", mark)
            right = give_feedback(http, answers, args.workers)
            mark = stage("feedback given", mark)
            exported = call(http, "POST", "/v1/feedback/exports", {"format": "sft", "metadata": {"loop": "sst2-loop"}})
            job = client.fine_tuning.jobs.create(
                model=BASE,
                training_file=exported["id"],
                suffix="sst2",
                method={
                    "type": "supervised",
                    "supervised": {
                        "hyperparameters": {"n_epochs": args.epochs, "batch_size": 8},
                        "adapter": {"type": "lora", "r": 16, "alpha": 32},
                        "max_seq_length": 256,
                        "warmup_ratio": 0.06,  # benchmarks/finetune_chat_sst2.py's recipe
                        "group_by_length": True,  # less padding computed, the same examples
                    },
                },
            )
            done = poll(
                lambda: client.fine_tuning.jobs.retrieve(job.id).model_dump(),
                lambda j: j["status"] in ("succeeded", "failed", "cancelled"),
                "the fine-tuning job",
            )
            if done["status"] != "succeeded":
                raise SystemExit(f"fine-tuning {done['status']}: {done.get('error')}")
            candidate = str(done["fine_tuned_model"])
            mark = stage(f"exported {exported['id']} and fine-tuned {candidate}", mark)

            evaluation = call(
                http,
                "POST",
                "/v1/evals",
                {
                    "name": "sst2 held-out",
                    "data_source_config": {
                        "type": "custom",
                        "item_schema": {
                            "type": "object",
                            "properties": {"text": {"type": "string"}, "label": {"type": "string"}},
                            "required": ["text", "label"],
                        },
                        "include_sample_schema": True,
                    },
                    "testing_criteria": [
                        {
                            "type": "string_check",
                            "name": "label",
                            "input": "{{sample.output_json.sentiment}}",
                            "reference": "{{item.label}}",
                            "operation": "eq",
                        }
                    ],
                },
            )
            baseline_run = eval_run(http, evaluation["id"], PRODUCTION, held_out)
            candidate_run = eval_run(http, evaluation["id"], candidate, held_out)
            mark = stage("eval runs (production and candidate)", mark)
            pair = f"run_a={candidate_run['id']}&run_b={baseline_run['id']}"
            compared = call(http, "GET", f"/v1/evals/{evaluation['id']}/compare?{pair}")["overall"]

            comparison = {
                "eval_id": evaluation["id"],
                "candidate_run": candidate_run["id"],
                "baseline_run": baseline_run["id"],
            }
            promoted = http.post(
                f"/v1/model_aliases/{PRODUCTION}/promote", json={"target": candidate, "eval": comparison}
            )
            decision = promoted.json().get("promotion") or promoted.json()
            now_answering = client.chat.completions.create(
                model=PRODUCTION, messages=[{"role": "user", "content": PROMPT.format(text="a gem")}], max_tokens=2
            ).model
            mark = stage(f"promotion answered {promoted.status_code}; production answers as {now_answering}", mark)

            def split(users: int) -> dict[str, int]:
                """Which version answered each of ``users`` end users."""
                seen = collections.Counter(
                    client.chat.completions.create(
                        model=PRODUCTION, messages=[{"role": "user", "content": "Hi"}], max_tokens=1, user=f"u{k}"
                    ).model
                    for k in range(users)
                )
                return dict(seen)

            traffic: dict[str, dict[str, int]] = {}
            if promoted.status_code == 200:  # the old version back as a 10% canary, then two rollbacks
                canary = {"canaries": [{"target": f"{BASE}@1", "weight": 10}]}
                call(http, "POST", f"/v1/model_aliases/{PRODUCTION}/canary", canary)
                traffic["canary of the base at 10%, 100 users"] = split(100)
                call(http, "POST", f"/v1/model_aliases/{PRODUCTION}/rollback")
                traffic["rollback 1 (the canary ends), 20 users"] = split(20)
                call(http, "POST", f"/v1/model_aliases/{PRODUCTION}/rollback")
                traffic["rollback 2 (back to the base), 20 users"] = split(20)
                stage("canary and rollbacks", mark)
        finally:
            server.terminate()
            server.wait(timeout=60)
    total = time.perf_counter() - started
    before, after = accuracy(baseline_run), accuracy(candidate_run)
    row = {
        "train_sentences": len(train),
        "held_out_sentences": len(held_out),
        "answers_right_before_feedback": right / len(answers),
        "accuracy_before": before,
        "accuracy_after": after,
        "difference": compared["difference"],
        "interval_95": compared["interval"],
        "promotion_status": promoted.status_code,
        "decision": decision,
        "production_answers_as": now_answering,
        "traffic": traffic,
        "epochs": args.epochs,
        "stages_s": stages,
        "total_s": total,
    }
    print(f"\n{'accuracy before':>16} {'after':>6} {'difference [95% interval]':>30} {'promoted':>9} {'total s':>8}")
    low, high = compared["interval"]
    interval = f"{compared['difference']:+.3f} [{low:+.3f}, {high:+.3f}]"
    print(f"{before:16.3f} {after:6.3f} {interval:>30} {promoted.status_code == 200!s:>9} {total:8.0f}")
    for what, seen in traffic.items():
        print(f"{what}: {seen}")
    write_result("feedback_loop", row)


if __name__ == "__main__":
    main()
