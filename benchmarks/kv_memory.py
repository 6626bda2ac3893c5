"""Resident memory of `llmos serve` against its key/value budget (`kv_cache_mb`) at the largest batch.

Starts the real server with a given `kv_cache_mb` (prefix caching off, room for 64 rows), as it is
now and as it was before its burst memory was bounded (`heap_slack_mb` 0: freed memory given back
only when the engine goes idle; oneDNN's two primitive caches at their default 1,024 entries),
loads the model with one request, then sends a crowd of chat requests at once, twice, each
reserving its prompt plus `max_tokens`, so that admission fills the budget; the server's RSS is
sampled throughout. The first crowd's rise above the idle server is what a burst costs a fresh
server (oneDNN meets its shapes for the first time); the second crowd's peak above the idle
server before it, as a fraction of the budget, is what a burst costs once the server has served.

    .venv/bin/python benchmarks/kv_memory.py [--budgets-mb 64 256] [--versions before now] [--clients 64]
        [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import KEY, MODEL, ROOT, PeakRss, prompts, start_server, write_result

HEADERS = {"Authorization": f"Bearer {KEY}"}
VERSIONS = {
    "now": {},
    "before": {"LLMOS_HEAP_SLACK_MB": "0", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024", "LRU_CACHE_CAPACITY": "1024"},
}


def chat(url: str, messages: list[dict[str, str]], max_tokens: int) -> int:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=HEADERS, timeout=600)
    reply.raise_for_status()
    return int(reply.json()["usage"]["completion_tokens"])


def run(home: Path, budget_mb: int, version: str, clients: int, max_tokens: int) -> dict[str, float | int | str]:
    env = {
        **VERSIONS[version],
        "LLMOS_KV_CACHE_MB": str(budget_mb),
        "LLMOS_MAX_BATCH_SIZE": "64",
        "LLMOS_PREFIX_CACHE_MB": "0",
        "LLMOS_TENANT_ROWS_WHEN_SHARED": "0",
    }
    proc, url = start_server(home, env=env)
    try:
        chats = prompts(clients + 1)
        chat(url, chats[0], 8)  # loads the model
        time.sleep(1.5)
        rounds = []
        for _ in range(2):  # the first crowd also meets every product shape for the first time
            with PeakRss(proc.pid) as rss:
                time.sleep(1.0)
                idle = rss._rss()
                start = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    tokens = sum(pool.map(lambda m: chat(url, m, max_tokens), chats[1:]))
                rounds.append((idle, rss.peak, tokens, time.perf_counter() - start))
            time.sleep(1.5)
        engine = httpx.get(f"{url}/v1/admin/engine", headers=HEADERS, timeout=30).json()
        served = next(m for m in engine["models"].values() if m["name"] == MODEL)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    budget = served["kv_cache_budget_bytes"]
    (idle, first_peak, _, _), (second_idle, peak, tokens, seconds) = rounds
    growth = max(0, peak - second_idle)
    return {
        "kv_cache_mb": budget_mb,
        "version": version,
        "clients": clients,
        "max_tokens": max_tokens,
        "peak_rows": served["peak_rows"],
        "tokens": tokens,
        "seconds": round(seconds, 1),
        "rss_idle_mb": round(idle / 2**20, 1),
        "rss_first_crowd_peak_mb": round(first_peak / 2**20, 1),
        "rss_first_rise_mb": round(max(0, first_peak - idle) / 2**20, 1),
        "rss_idle_after_first_mb": round(second_idle / 2**20, 1),
        "rss_second_crowd_peak_mb": round(peak / 2**20, 1),
        "rss_growth_mb": round(growth / 2**20, 1),
        "growth_per_budget": round(growth / budget, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets-mb", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--versions", nargs="+", choices=sorted(VERSIONS), default=["before", "now"])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    args = parser.parse_args()
    settings = [(mb, version) for mb in args.budgets_mb for version in args.versions]
    rows = [run(args.home, mb, version, args.clients, args.max_tokens) for mb, version in settings]
    header = (
        "kv_cache_mb",
        "version",
        "rows",
        "idle",
        "1st peak",
        "1st rise",
        "idle",
        "2nd peak",
        "growth",
        "/budget",
    )
    print(" ".join(f"{h:>11}" for h in header))
    for r in rows:
        mb = (
            "rss_idle_mb",
            "rss_first_crowd_peak_mb",
            "rss_first_rise_mb",
            "rss_idle_after_first_mb",
            "rss_second_crowd_peak_mb",
        )
        cells = [f"{r['kv_cache_mb']}", f"{r['version']}", f"{r['peak_rows']}", *(f"{r[k]:.0f}MB" for k in mb)]
        cells += [f"{r['rss_growth_mb']:.0f}MB", f"{r['growth_per_budget']:.3f}"]
        print(" ".join(f"{c:>11}" for c in cells))
    write_result("kv_memory", {"rows": rows})


if __name__ == "__main__":
    main()
