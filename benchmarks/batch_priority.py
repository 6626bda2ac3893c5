"""Does a running batch slow interactive clients? Interactive TTFT with and without a batch.

    python benchmarks/batch_priority.py                  # 16 clients, a 2,000-line batch
    python benchmarks/batch_priority.py --repeats 3 --batch-lines 500

One ``llmos serve`` (smollm2-135m-instruct, its own home under .cache). Runs alternate: the
interactive load alone, then the same load while a batch of ``--batch-lines`` chat requests runs
(created, seen ``in_progress``, cancelled after the run), ``--repeats`` times each. The interactive
load is serve.py's: ``--clients`` streaming clients, ``--requests`` requests a run, greedy,
``--max-tokens``; each run sends prompts no other run sent (prefixes are cached). Batch lines are
numbered prompts (so no two share a prefix) from the end of the same file. Reports TTFT p50/p99,
tokens/s of the interactive clients and the batch lines answered during each run with a batch
(it must progress), and the ratio of the p50 TTFTs; writes benchmarks/results/batch_priority-*.json.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import KEY, MODEL, ROOT, prompts, start_server, write_result
from benchmarks.serve import WARM_UP, drive, stream_chat

HEADERS = {"Authorization": f"Bearer {KEY}"}


def prepare_home(home: Path, source_home: Path) -> None:
    """A home of its own holding the model, registered from the serve benchmark's copy."""
    from llmos.config import Settings
    from llmos.platform import Platform

    platform = Platform.open(Settings(home=home))
    try:
        if not platform.registry.list():
            source = Platform.open(Settings(home=source_home))
            model_dir = source.registry.model_dir(source.registry.get(MODEL))
            source.close()
            platform.registry.pull(f"file:{model_dir}", name=MODEL)
    finally:
        platform.close()


def batch_file(chats: list[list[dict[str, str]]], lines: int, max_tokens: int) -> bytes:
    rows = []
    for i in range(lines):
        chat = chats[i % len(chats)]
        content = f"Request {i}. {chat[0]['content']}"
        body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
        rows.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
    return "\n".join(json.dumps(r) for r in rows).encode()


def start_batch(http: httpx.Client, url: str, content: bytes) -> str:
    files = {"file": ("batch.jsonl", io.BytesIO(content), "application/jsonl")}
    upload = http.post(f"{url}/v1/files", headers=HEADERS, files=files, data={"purpose": "batch"}).json()
    body = {"input_file_id": upload["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    batch = http.post(f"{url}/v1/batches", headers=HEADERS, json=body).json()
    while batch_state(http, url, batch["id"])["status"] != "in_progress" or answered(http, url, batch["id"]) < 1:
        time.sleep(0.2)  # running, and past its first lines' prefill
    return str(batch["id"])


def batch_state(http: httpx.Client, url: str, batch_id: str) -> dict[str, Any]:
    return dict(http.get(f"{url}/v1/batches/{batch_id}", headers=HEADERS).json())


def answered(http: httpx.Client, url: str, batch_id: str) -> int:
    counts = batch_state(http, url, batch_id)["request_counts"]
    return int(counts["completed"]) + int(counts["failed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="interactive requests a run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each kind, alternating")
    parser.add_argument("--batch-lines", type=int, default=2000)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-batch-home")
    parser.add_argument("--source-home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    chats = prompts(10_000)
    interactive_chats = chats[: args.requests * 2 * args.repeats]
    batch_chats = chats[len(interactive_chats) : WARM_UP]
    prepare_home(args.home, args.source_home)
    proc, url = start_server(args.home)
    runs: list[dict[str, Any]] = []
    try:
        stream_chat(url, MODEL, chats[WARM_UP], 4)  # load the model before timing
        with httpx.Client(timeout=120) as http:
            for r in range(2 * args.repeats):
                with_batch = r % 2 == 1
                start = r * args.requests
                batch_id = (
                    start_batch(http, url, batch_file(batch_chats, args.batch_lines, args.max_tokens))
                    if with_batch
                    else None
                )
                before = answered(http, url, batch_id) if batch_id else 0
                row = drive(
                    url,
                    proc.pid,
                    lambda _: MODEL,
                    interactive_chats[start : start + args.requests],
                    args.clients,
                    args.max_tokens,
                )
                row["batch"] = with_batch
                if batch_id:
                    row["batch_lines_answered"] = answered(http, url, batch_id) - before
                    http.post(f"{url}/v1/batches/{batch_id}/cancel", headers=HEADERS)
                    while batch_state(http, url, batch_id)["status"] != "cancelled":
                        time.sleep(0.2)
                runs.append(row)
                print(
                    f"  {'with' if with_batch else 'without'} batch: TTFT p50 {row['ttft_p50_s']:.3f} s, "
                    f"{row['tokens_per_s']:.1f} tok/s"
                    + (f", batch lines answered {row['batch_lines_answered']}" if with_batch else "")
                )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    alone = statistics.median(r["ttft_p50_s"] for r in runs if not r["batch"])
    busy = statistics.median(r["ttft_p50_s"] for r in runs if r["batch"])
    print(f"interactive TTFT p50: {alone:.3f} s alone, {busy:.3f} s with a batch running ({busy / alone:.2f}x)")
    result = {
        "model": MODEL,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "batch_lines": args.batch_lines,
        "runs": runs,
        "ttft_p50_alone_s": alone,
        "ttft_p50_with_batch_s": busy,
        "ratio": busy / alone,
    }
    write_result("batch_priority", result, args.out)


if __name__ == "__main__":
    main()
