"""Speculative decoding of a single stream (docs/adr/0027): one client, greedy, SmolLM2-135M-Instruct
summarising SciTLDR abstracts (answers that copy their input), served with speculation off and
on in the same run, and the cost of a verify pass against a decode step.

    python -m benchmarks.speculative [--prompts 8] [--workload summaries|chat] [--max-tokens 128]
        [--modes off,auto,ngram] [--dtype auto]

Part 1 (in process, the model's lean layers): a decode step of one row and verify passes of
``k`` drafts (``k + 1`` tokens with every position's logits) over the same cache, median of
``--repeats`` each; the ratios are the cost model of ``auto``'s rule. Part 2 (one ``llmos serve``
per mode, the bench-home registry, all running): each prompt answered by each server in turn,
tokens/s over the requests' wall time and over their decoding (streamed, from the first token
to the last: what speculation changes, without the prompt's prefill), the acceptance rate from
the usage's accepted and rejected prediction tokens, and whether every answer is the same as
with speculation off. With ``--late-arrivals N``, each server then answers N one-token requests
sent while another request's answer is decoding (0.5-2.5 s after its first token): how long a
request arriving during a speculated step waits, against one arriving during plain steps.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

from benchmarks.harness import (
    KEY,
    MODEL,
    RESULT_PREFIX,
    ROOT,
    print_child_result,
    prompts,
    start_server,
    write_result,
)

DATASET = ROOT.parent / "shared" / "datasets" / "sum_scitldr" / "test.jsonl"
INSTRUCTION = "Summarise this abstract in two or three sentences, keeping its own wording:\n\n"
DRAFTS = (1, 2, 4, 8, 16)
CHILD: dict[str, Any] = {"capture_output": True, "text": True, "check": True, "cwd": ROOT}


def summaries(n: int) -> list[str]:
    rows = [json.loads(line) for line in DATASET.read_text().splitlines() if line.strip()]
    return [INSTRUCTION + " ".join(s.strip() for s in row["source"]) for row in rows[:n]]


def workload(name: str, n: int) -> list[str]:
    """The user messages of ``name``: ``summaries`` (answers that copy their input, where drafts
    pay) or ``chat`` (Self-Instruct's instructions, answers that mostly do not: what ``auto``
    costs where there is little to draft)."""
    if name == "summaries":
        return summaries(n)
    return [conversation[0]["content"] for conversation in prompts(n)]


def verify_cost(
    model_dir: Path, dtype: torch.dtype, prompt: str, repeats: int, threads: int, draft_dir: Path | None = None
) -> dict[str, Any]:
    """Median seconds of a one-row decode step and of verifies of each draft length, over a cache
    holding ``prompt`` (rolled back after every pass, so each runs over the same cache); with
    ``draft_dir``, a draft model's decode step too, against the cost its ``DraftModel`` estimates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmos.engine.threads import configure, enter_compute_thread
    from llmos.engine.torch_backend.draft_model import DraftModel
    from llmos.engine.torch_backend.kv_cache import new_cache, truncate
    from llmos.engine.torch_backend.lean_decode import LeanDecoder

    configure(threads)
    enter_compute_thread()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, use_safetensors=True).eval()
    decoder = LeanDecoder.build(model, int8=False)
    assert decoder is not None
    decoder.match_lone_rows()  # as the server's runner does at load
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    cache = new_cache(model.config)
    decoder.prefill([(ids, 0, cache)])
    length = len(ids)
    attention = torch.ones((1, length + 1), dtype=torch.long)

    token = torch.tensor([ids[-1]])
    passes: dict[int, Any] = {0: lambda: decoder(token, torch.tensor([length]), attention, cache, None)}
    for k in DRAFTS:
        passes[k] = lambda k=k: decoder.verify(ids[-k - 1 :], length, cache)
    estimated = None
    if draft_dir is not None:
        small = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=dtype, use_safetensors=True).eval()
        drafter = DraftModel(small, name="draft", target=model, positions=model.config.max_position_embeddings)
        estimated = drafter.cost
        while not drafter.propose(ids, 1)[0]:  # until its cache holds the prompt (read in parts)
            pass
        draft_cache = drafter._cache
        passes[-1] = lambda: drafter.decoder(token, torch.tensor([length]), attention, draft_cache, None)
    times: dict[int, list[float]] = {k: [] for k in passes}
    for _ in range(repeats + 2):  # each kind of pass in turn, so that the machine's load weighs on all alike
        for k, run in passes.items():
            start = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - start)
            truncate(cache, length)
            if draft_dir is not None:
                truncate(draft_cache, length)
    step = statistics.median(times[0][2:])  # the first two rounds warm up
    verifies = {k: statistics.median(times[k][2:]) for k in DRAFTS}
    ratios = {k: verifies[k] / step for k in DRAFTS}
    # Least squares of ratio = base + per_draft * k, the form auto's rule uses.
    mean_k, mean_r = statistics.mean(DRAFTS), statistics.mean(ratios.values())
    per_draft = sum((k - mean_k) * (ratios[k] - mean_r) for k in DRAFTS) / sum((k - mean_k) ** 2 for k in DRAFTS)
    return {
        "cache_tokens": length,
        "decode_step_s": step,
        "verify_s": {str(k): verifies[k] for k in DRAFTS},
        "verify_over_step": {str(k): ratios[k] for k in DRAFTS},
        "fit_base": mean_r - per_draft * mean_k,
        "fit_per_draft": per_draft,
        "draft_step_over_step": statistics.median(times[-1][2:]) / step if draft_dir is not None else None,
        "draft_cost_estimated": estimated,
    }


LATE_PROMPT = "Say OK."


def late_wait(client: httpx.Client, url: str, body: dict[str, Any], seed: int) -> float:
    """Seconds a one-token request takes when it is sent 0.5-2.5 s (by ``seed``) after the first
    token of the streamed answer to ``body``, while that answer decodes."""
    started = threading.Event()
    failed: list[BaseException] = []

    def stream() -> None:
        try:
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        choices = json.loads(line[len("data: ") :]).get("choices") or [{}]
                        if choices[0].get("delta", {}).get("content"):
                            started.set()
        except BaseException as error:  # re-raised in the caller: a wait on an idle server is no measurement
            failed.append(error)
        finally:
            started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        started.wait(timeout=900)
        time.sleep(random.Random(seed).uniform(0.5, 2.5))
        if failed or not thread.is_alive():
            raise RuntimeError(f"the answer to wait behind failed or ended too soon: {failed}")
        late = {"model": body["model"], "messages": [{"role": "user", "content": LATE_PROMPT}], "max_tokens": 1}
        start = time.perf_counter()
        client.post(f"{url}/v1/chat/completions", json=late).raise_for_status()
        return time.perf_counter() - start
    finally:
        thread.join()


def served(
    home: Path,
    model: str,
    draft: str | None,
    modes: list[str],
    texts: list[str],
    max_tokens: int,
    dtype: str,
    threads: int,
    temperature: float,
    together: bool = True,
    late: int = 0,
) -> dict[str, dict[str, Any]]:
    """Every text answered by one server per ``speculative_decoding`` mode (``draft``: ``auto``
    with ``draft`` as ``model``'s draft model), all running, the modes taking turns prompt by
    prompt (so that the machine's other load weighs on each alike); not ``together``, one server
    after another (models too large for several in memory); ``late``: the late arrivals' waits."""
    runs: dict[str, dict[str, Any]] = {
        mode: {
            "tokens": 0,
            "seconds": 0.0,
            "decode_tokens": 0,
            "decode_seconds": 0.0,
            "draft_tokens": 0,
            "accepted_tokens": 0,
            "answers": [],
        }
        for mode in modes
    }
    for group in [modes] if together else [[mode] for mode in modes]:
        servers = {}
        try:
            for mode in group:
                settings = {
                    "LLMOS_SPECULATIVE_DECODING": "auto" if mode == "draft" else mode,
                    "LLMOS_DTYPE": dtype,
                    "LLMOS_THREADS": str(threads),
                }
                if mode == "draft":
                    settings["LLMOS_DRAFT_MODELS"] = json.dumps({model: draft})
                servers[mode] = start_server(home, settings)
            with httpx.Client(timeout=900, headers={"Authorization": f"Bearer {KEY}"}) as client:

                def ask(url: str, text: str) -> tuple[str, dict[str, Any], float, float]:
                    """The streamed answer, its usage, and the seconds to its first and last token."""
                    body = {
                        "model": model,
                        "messages": [{"role": "user", "content": text}],
                        "max_tokens": max_tokens,
                        "temperature": temperature,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    start = time.perf_counter()
                    first = last = 0.0
                    parts: list[str] = []
                    usage: dict[str, Any] = {}
                    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                        resp.raise_for_status()
                        for line in resp.iter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[len("data: ") :])
                            usage = chunk.get("usage") or usage
                            for choice in chunk.get("choices", []):
                                if choice["delta"].get("content"):
                                    last = time.perf_counter() - start
                                    first = first or last
                                    parts.append(choice["delta"]["content"])
                    return "".join(parts), usage, first, last

                for _, url in servers.values():
                    ask(url, "Hello")  # the model loads
                for text in texts:
                    for mode, (_, url) in servers.items():
                        start = time.perf_counter()
                        answer, usage, first, last = ask(url, text)
                        run = runs[mode]
                        run["seconds"] += time.perf_counter() - start
                        # After the first token: the decoding that speculation changes, without the prompt's prefill.
                        run["decode_seconds"] += last - first
                        run["decode_tokens"] += usage["completion_tokens"] - 1
                        details = usage.get("completion_tokens_details") or {}
                        run["answers"].append(answer)
                        run["tokens"] += usage["completion_tokens"]
                        run["accepted_tokens"] += details.get("accepted_prediction_tokens", 0)
                        run["draft_tokens"] += details.get("accepted_prediction_tokens", 0)
                        run["draft_tokens"] += details.get("rejected_prediction_tokens", 0)
                for mode, (_, url) in servers.items() if late else []:
                    ask(url, LATE_PROMPT)  # its prefix cached, as for every later arrival
                    bodies = [
                        {
                            "model": model,
                            "messages": [{"role": "user", "content": texts[i % len(texts)]}],
                            "max_tokens": max_tokens,
                            "temperature": temperature,
                            "stream": True,
                        }
                        for i in range(late)
                    ]
                    runs[mode]["late_waits"] = [late_wait(client, url, body, i) for i, body in enumerate(bodies)]
        finally:
            for proc, _ in servers.values():
                proc.send_signal(signal.SIGTERM)
            for proc, _ in servers.values():
                proc.wait(timeout=60)
    for run in runs.values():
        run["tokens_per_s"] = run["tokens"] / run["seconds"]
        run["decode_tokens_per_s"] = run["decode_tokens"] / run["decode_seconds"]
        run["acceptance_rate"] = run["accepted_tokens"] / run["draft_tokens"] if run["draft_tokens"] else None
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--workload", default="summaries", choices=["summaries", "chat"])
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0: greedy (answers compared); above, sampled (unseeded)"
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--modes", default="off,auto,ngram", help="speculative_decoding values, off first; draft: auto with --draft"
    )
    parser.add_argument("--model", default=MODEL, help="the served model (bench-home registry)")
    parser.add_argument("--draft", default=None, help="its draft model, for the draft mode (draft_models)")
    parser.add_argument("--repeats", type=int, default=30, help="timed passes of each verify length")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the engine (0: torch's default)")
    parser.add_argument("--cost-only", action="store_true", help="measure the verify's cost only (part 1)")
    parser.add_argument(
        "--one-server-at-a-time", action="store_true", help="the modes' servers in turn (a model too large for two)"
    )
    parser.add_argument(
        "--late-arrivals", type=int, default=0, help="one-token requests sent while an answer decodes, per mode"
    )
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: a new dated one; never replaced)")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "off":
        raise SystemExit("--modes must start with off (the answers the others are compared with)")
    if ("draft" in modes) != (args.draft is not None):
        raise SystemExit("the draft mode and --draft go together")

    from llmos.config import Settings
    from llmos.engine.local import resolve_dtype
    from llmos.platform import Platform

    platform = Platform.open(Settings(home=args.home))
    model_dir = platform.registry.model_dir(platform.registry.get(args.model))
    draft_dir = platform.registry.model_dir(platform.registry.get(args.draft)) if args.draft else None
    dtype = resolve_dtype(args.dtype)
    platform.close()
    texts = workload(args.workload, args.prompts)
    if args.cost_only:
        print_child_result(verify_cost(model_dir, dtype, texts[0], args.repeats, args.threads, draft_dir))
        return
    # In a process of its own: its models' memory is gone before the servers load theirs.
    child = [a for a in sys.argv[1:] if a != "--one-server-at-a-time"]
    out = subprocess.run([sys.executable, "-m", "benchmarks.speculative", *child, "--cost-only"], **CHILD).stdout
    cost = json.loads(next(line for line in out.splitlines() if line.startswith(RESULT_PREFIX))[len(RESULT_PREFIX) :])
    runs = served(
        args.home,
        args.model,
        args.draft,
        modes,
        texts,
        args.max_tokens,
        args.dtype,
        args.threads,
        args.temperature,
        together=not args.one_server_at_a_time,
        late=args.late_arrivals,
    )
    base = runs["off"]
    result: dict[str, Any] = {
        "model": args.model,
        "draft_model": args.draft,
        "dtype": str(dtype).removeprefix("torch."),
        "workload": args.workload,
        "prompts": len(texts),
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "threads": args.threads,
        "verify_cost": cost,
        "served": {mode: {k: v for k, v in run.items() if k != "answers"} for mode, run in runs.items()},
    }
    for mode, run in runs.items():
        result["served"][mode]["speedup"] = run["tokens_per_s"] / base["tokens_per_s"]
        result["served"][mode]["decode_speedup"] = run["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        same = [a == b for a, b in zip(run["answers"], base["answers"], strict=True)]
        # Sampled answers differ from run to run whatever the mode: only greedy ones are compared.
        result["served"][mode]["identical_answers"] = sum(same) if args.temperature == 0 else None
    what = "SciTLDR summaries" if args.workload == "summaries" else "Self-Instruct chat answers"
    how = "greedy" if args.temperature == 0 else f"sampled at temperature {args.temperature:g}"
    drafting = f", draft model {args.draft}" if args.draft else ""
    print(f"{args.model} ({result['dtype']}){drafting}, 1 client, {how}, {len(texts)} {what}, {args.max_tokens} tokens")
    print(f"verify cost over a {cost['cache_tokens']}-token cache (decode step {cost['decode_step_s'] * 1000:.1f} ms):")
    print("  " + "  ".join(f"k={k}: {cost['verify_over_step'][str(k)]:.2f}x" for k in DRAFTS))
    print(f"  fit: {cost['fit_base']:.3f} + {cost['fit_per_draft']:.4f} k")
    if args.draft:
        print(
            f"draft model's decode step: {cost['draft_step_over_step']:.2f}x the target's "
            f"(estimated by weight bytes: {cost['draft_cost_estimated']:.2f}x)"
        )
    print("whole requests (prefill included) and decoding after the first token:")
    print(
        f"{'mode':<8} {'tokens':>7} {'tokens/s':>9} {'speedup':>8} {'decode tok/s':>13} {'speedup':>8} "
        f"{'accepted':>9} {'identical':>10}"
    )
    for mode in modes:
        row = result["served"][mode]
        rate = "-" if row["acceptance_rate"] is None else f"{row['acceptance_rate']:.0%}"
        same = "-" if row["identical_answers"] is None else f"{row['identical_answers']}/{len(texts)}"
        print(
            f"{mode:<8} {row['tokens']:>7} {row['tokens_per_s']:>9.1f} {row['speedup']:>7.2f}x "
            f"{row['decode_tokens_per_s']:>13.1f} {row['decode_speedup']:>7.2f}x {rate:>9} "
            f"{same:>10}"
        )
    if args.late_arrivals:
        print(f"a one-token request arriving while an answer decodes ({args.late_arrivals} each), seconds:")
        for mode in modes:
            waits = result["served"][mode]["late_waits"]
            print(f"{mode:<8} median {statistics.median(waits):.2f}  max {max(waits):.2f}")
    write_result("speculative", result, args.out)


if __name__ == "__main__":
    main()
