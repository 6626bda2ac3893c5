"""Concurrent chat serving: LLM OS against a naive baseline, same model, same prompts, same run.

    python benchmarks/serve_concurrency.py [--clients 1 4 16] [--max-tokens 64] [--requests 16]

Prompts come from ../shared/datasets/sft_self_instruct/test.jsonl. The baseline is what a user
without a server writes: one ``model.generate`` per request, one after another (transformers,
default float32). LLM OS runs as a real server (``llmos serve``) driven over HTTP with streaming.
Prints a table and writes benchmarks/results/serve_concurrency.json. Ratios are against the
baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "datasets" / "sft_self_instruct" / "test.jsonl"
MODEL = "smollm2-135m-instruct"
KEY = "bench-admin-key-0123456789"


def prompts(n: int) -> list[list[dict[str, str]]]:
    rows = [json.loads(line) for line in DATASET.read_text().splitlines() if line.strip()]
    out = []
    for row in rows[:n]:
        text = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
        out.append([{"role": "user", "content": text}])
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class PeakRss:
    """Samples the resident memory of a process (and its children) while a run lasts."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _rss(self) -> int:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_baseline(model_dir: Path, chats: list[list[dict[str, str]]], max_tokens: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ttfts, tokens = [], 0
    start = time.perf_counter()
    cpu0 = time.process_time()
    for chat in chats:
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")["input_ids"]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        ttfts.append(time.perf_counter() - t0)  # no streaming: the first token arrives with the last
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - start
    return {
        "clients": 1,
        "requests": len(chats),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "cpu_util": (time.process_time() - cpu0) / wall / (os.cpu_count() or 1),
    }


def stream_one(url: str, chat: list[dict[str, str]], max_tokens: int) -> tuple[float, float, int]:
    body = {
        "model": MODEL,
        "messages": chat,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    usage = 0
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json=body, timeout=600, headers={"Authorization": f"Bearer {KEY}"}
    ) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    return first or total, total, usage


def run_server(
    url: str, pid: int, chats: list[list[dict[str, str]]], clients: int, max_tokens: int
) -> dict[str, float]:
    cpu0 = cpu_seconds(pid)
    start = time.perf_counter()
    with PeakRss(pid) as rss, ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda c: stream_one(url, c, max_tokens), chats))
    wall = time.perf_counter() - start
    tokens = sum(r[2] for r in results)
    tpot = [(r[1] - r[0]) / max(1, r[2] - 1) for r in results]
    return {
        "clients": clients,
        "requests": len(chats),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile([r[0] for r in results], 0.5),
        "ttft_p99_s": percentile([r[0] for r in results], 0.99),
        "tpot_p50_s": statistics.median(tpot),
        "peak_rss_mb": rss.peak / 2**20,
        "cpu_util": (cpu_seconds(pid) - cpu0) / wall / (os.cpu_count() or 1),
    }


def start_server(home: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "LLMOS_HOME": str(home),
        "LLMOS_ADMIN_KEY": KEY,
        "LLMOS_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmos", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(1800):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    args = parser.parse_args()
    chats = prompts(args.requests)

    proc, url = start_server(args.home)
    try:
        stream_one(url, chats[0], 4)  # load the model before timing
        rows = {f"llmos, {c} client(s)": run_server(url, proc.pid, chats, c, args.max_tokens) for c in args.clients}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    from llmos.config import Settings
    from llmos.platform import Platform

    platform = Platform.open(Settings(home=args.home))
    model_dir = platform.registry.model_dir(platform.registry.get(MODEL))
    baseline = run_baseline(model_dir, chats, args.max_tokens)
    rows = {"naive model.generate, sequential (fp32)": baseline, **rows}

    columns = ("tok/s", 8), ("x naive", 8), ("TTFT p50", 9), ("TTFT p99", 9), ("TPOT p50", 9), ("RSS MB", 7), ("CPU", 5)
    header = f"{'system':42} " + " ".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        r["ratio_vs_naive"] = r["tokens_per_s"] / baseline["tokens_per_s"]
        tpot = f"{r['tpot_p50_s'] * 1000:7.0f}ms" if "tpot_p50_s" in r else f"{'-':>9}"
        rss = f"{r['peak_rss_mb']:7.0f}" if "peak_rss_mb" in r else f"{'-':>7}"
        print(
            f"{name:42} {r['tokens_per_s']:8.1f} {r['ratio_vs_naive']:8.2f} {r['ttft_p50_s']:8.2f}s "
            f"{r['ttft_p99_s']:8.2f}s {tpot} {rss} {r['cpu_util']:5.0%}"
        )
    out = ROOT / "benchmarks" / "results" / "serve_concurrency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "model": MODEL,
                "max_tokens": args.max_tokens,
                "requests": args.requests,
                "date": time.strftime("%Y-%m-%d"),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
