"""Scoring prompts through the server against the same weights in-process, and what scoring
traffic does to interactive clients.

    python benchmarks/scoring.py [--prompts 1000] [--clients 8] [--batch 8]

The prompts: a two-way multiple choice built from ../shared/datasets/qa_xquad_en (a paragraph's
first 70 tokens, the question, then " Answer: " and the right answer or another question's
answer), about 100 tokens each, 2 prompts an item. Model smollm2-135m-instruct in the dtype
``llmos serve`` picks on this CPU.
- served: each prompt one ``/v1/completions`` request with ``echo``, ``logprobs: 1`` and
  ``max_tokens: 0`` (what lm-evaluation-harness sends), from ``--clients`` concurrent clients,
  nothing else running;
- in-process: transformers' forward of the same weights, ``--batch`` prompts a pass (padded),
  every position's log-softmax gathered, as a harness running the model itself does;
- interactive TTFT: one client's streamed chat requests (16 tokens), 8 on the idle server, then 8
  while the scoring clients, in a process of their own, score other prompts, ``--ttft-rounds``
  times in turn (``--load-prompts`` shared between the rounds); the loaded requests' TTFT p50
  against the idle ones' (scoring yields to them, ``scoring_step_tokens``).
Prints prompts/s and tokens/s both ways (their ratio is the goal's) and the two TTFTs; writes a
new benchmarks/results/scoring-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import KEY, MODEL, ROOT, start_server, write_result
from benchmarks.serve import prompts as chat_prompts
from benchmarks.serve import stream_chat

XQUAD = ROOT.parent / "shared" / "datasets" / "qa_xquad_en" / "test.jsonl"
CONTEXT_TOKENS = 70


def choice_prompts(tokenizer: Any, n: int) -> list[str]:
    rows = [json.loads(line) for line in XQUAD.read_text().splitlines() if line.strip()]
    out: list[str] = []
    for i, row in enumerate(rows[: (n + 1) // 2]):
        context = tokenizer.decode(tokenizer(row["context"])["input_ids"][:CONTEXT_TOKENS])
        stem = f"{context}\nQuestion: {row['question']}\nAnswer:"
        wrong = rows[(i + 7) % len(rows)]["answers"]["text"][0]
        out += [f"{stem} {row['answers']['text'][0]}", f"{stem} {wrong}"]
    return out[:n]


def served(url: str, texts: list[str], clients: int, on_way_out: Callable[[], None] = lambda: None) -> dict[str, float]:
    pools = [httpx.Client(timeout=600) for _ in range(clients)]
    local = threading.local()
    counter = iter(range(clients))
    lock = threading.Lock()

    def one(text: str) -> int:
        if not hasattr(local, "client"):
            with lock:
                local.client = pools[next(counter)]
        body = {"model": MODEL, "prompt": text, "echo": True, "logprobs": 1, "max_tokens": 0}
        resp = local.client.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        resp.raise_for_status()
        logprobs = resp.json()["choices"][0]["logprobs"]["token_logprobs"]
        assert logprobs[0] is None and all(isinstance(x, float) for x in logprobs[1:])
        return int(resp.json()["usage"]["prompt_tokens"])

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, texts[:1]))
        on_way_out()  # the load is under way
        tokens += sum(pool.map(one, texts[1:]))
    seconds = time.perf_counter() - start
    for client in pools:
        client.close()
    return {"seconds": seconds, "prompts_per_s": len(texts) / seconds, "tokens_per_s": tokens / seconds}


@torch.inference_mode()
def in_process(model_dir: Path, texts: list[str], batch: int, dtype: torch.dtype) -> dict[str, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "right"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    model(**tokenizer(texts[:batch], return_tensors="pt", padding=True))  # warm up
    tokens = 0
    start = time.perf_counter()
    for k in range(0, len(texts), batch):
        enc = tokenizer(texts[k : k + batch], return_tensors="pt", padding=True)
        logits = model(**enc).logits.float()
        scores = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, enc["input_ids"][:, 1:, None])
        assert torch.isfinite(scores).all()
        tokens += int(enc["attention_mask"].sum())
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "prompts_per_s": len(texts) / seconds, "tokens_per_s": tokens / seconds}


def interactive_ttft(url: str, chats: list[list[dict[str, str]]]) -> list[float]:
    with httpx.Client(timeout=600) as client:
        return [stream_chat(url, MODEL, chat, 16, client).ttft for chat in chats]


def beside_scoring(
    url: str, chats: list[list[dict[str, str]]], texts: list[str], clients: int, niceness: int
) -> tuple[list[float], dict[str, float], bool]:
    """The interactive requests' TTFTs while ``clients`` score ``texts``, the scoring's own figures,
    and whether it outlasted them. The scoring clients run in a process of their own, as they would
    on other machines: in this one, parsing their answers would hold the interactive client's GIL.
    ``niceness`` lowers that process's CPU priority below the server's: on two cores, the clients'
    own work (they would run elsewhere) otherwise takes time from the server's forward passes."""
    load = subprocess.Popen(
        ["nice", "-n", str(niceness), sys.executable, __file__, "--score-load", url, "--clients", str(clients)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert load.stdin is not None and load.stdout is not None
    load.stdin.write(json.dumps(texts))
    load.stdin.close()
    assert load.stdout.readline().strip() == "under way"
    time.sleep(1)
    ttfts = interactive_ttft(url, chats)
    outlasted = load.poll() is None
    figures = json.loads(load.stdout.read())
    assert load.wait() == 0
    return ttfts, figures, outlasted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--load-prompts", type=int, default=240, help="scoring prompts sent while TTFT is measured")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="prompts a forward pass in-process")
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: a new dated one; never replaced)")
    parser.add_argument("--ttft-rounds", type=int, default=4, help="idle and loaded interactive rounds in turn")
    parser.add_argument(
        "--load-niceness", type=int, default=0, help="nice value of the scoring clients' process (0: the server's)"
    )
    parser.add_argument("--score-load", metavar="URL", help=argparse.SUPPRESS)  # the load's own process
    args = parser.parse_args()
    if args.score_load:
        texts = json.loads(sys.stdin.read())
        result = served(args.score_load, texts, args.clients, lambda: print("under way", flush=True))
        print(json.dumps(result))
        return

    from transformers import AutoTokenizer

    from llmos.config import Settings
    from llmos.engine.local import resolve_dtype
    from llmos.platform import Platform

    platform = Platform.open(Settings(home=args.home))
    model_dir = platform.registry.model_dir(platform.registry.get(MODEL))
    dtype = resolve_dtype(platform.settings.dtype)
    pause_ratio = platform.settings.scoring_pause_ratio  # the server's: it reads the same environment
    platform.close()
    every = choice_prompts(AutoTokenizer.from_pretrained(model_dir), args.prompts + args.load_prompts)
    texts, load_texts = every[: args.prompts], every[args.prompts :]  # the load's prompts are not cached
    chats = chat_prompts(10_000)[-(16 * args.ttft_rounds + 2) : -1]  # prompts no other benchmark row starts with

    proc, url = start_server(args.home)
    try:
        stream_chat(url, MODEL, chats[-1], 4)  # load the model
        server = served(url, texts, args.clients)  # scoring alone: the throughput goal's figure
        # Idle and loaded in turn, --ttft-rounds times: one burst of interactive requests swings
        # more between runs than scoring moves it.
        idle: list[float] = []
        loaded: list[float] = []
        loads: list[dict[str, float]] = []
        outlasted = True  # every loaded interactive request met scoring traffic
        share = len(load_texts) // args.ttft_rounds
        for r in range(args.ttft_rounds):
            asked = chats[16 * r : 16 * (r + 1)]
            idle += interactive_ttft(url, asked[:8])
            ttfts, load, lasted = beside_scoring(
                url, asked[8:], load_texts[share * r : share * (r + 1)], args.clients, args.load_niceness
            )
            loaded += ttfts
            loads.append(load)
            outlasted &= lasted
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    local = in_process(model_dir, texts, args.batch, dtype)
    result: dict[str, Any] = {
        "model": MODEL,
        "dtype": str(dtype).removeprefix("torch."),
        "prompts": len(texts),
        "clients": args.clients,
        "batch": args.batch,
        "served": server,
        "in_process": local,
        "served_over_in_process": server["tokens_per_s"] / local["tokens_per_s"],
        "scoring_beside_interactive": loads,
        "load_outlasted_interactive": outlasted,
        "load_niceness": args.load_niceness,
        "scoring_pause_ratio": pause_ratio,
        "ttft_rounds": args.ttft_rounds,
        "ttft_p50_idle_s": statistics.median(idle),
        "ttft_p50_while_scoring_s": statistics.median(loaded),
    }
    result["ttft_ratio"] = result["ttft_p50_while_scoring_s"] / result["ttft_p50_idle_s"]
    print(
        f"{len(texts)} prompts, {MODEL} ({result['dtype']}), {args.clients} clients / batches of {args.batch}, "
        f"scoring_pause_ratio {pause_ratio:g}"
    )
    print(f"{'':<30} {'prompts/s':>10} {'tokens/s':>10}")
    for name in ("served", "in_process"):
        print(f"{name:<30} {result[name]['prompts_per_s']:>10.1f} {result[name]['tokens_per_s']:>10.0f}")
    print(f"served / in-process: {result['served_over_in_process']:.2f}x")
    print(
        f"interactive TTFT p50: {result['ttft_p50_idle_s']:.3f} s idle, "
        f"{result['ttft_p50_while_scoring_s']:.3f} s while scoring ({result['ttft_ratio']:.2f}x, "
        f"{len(idle)} requests each, {args.ttft_rounds} rounds in turn); scoring beside them "
        f"{statistics.mean(x['prompts_per_s'] for x in loads):.1f} prompts/s"
        + ("" if outlasted else " (ended before them: use more)")
    )
    print(f"wrote {write_result('scoring', result, args.out)}")


if __name__ == "__main__":
    main()
