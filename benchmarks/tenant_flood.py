"""One tenant floods the server; how much slower does another tenant's traffic get?

    python benchmarks/tenant_flood.py [--flooders 24] [--requests 12] [--max-tokens 32]

Runs a real server (`llmos serve`, SmolLM2), creates tenants `quiet` and `flood`, and measures
the quiet tenant's request latency (p50/p99, non-streaming chat, greedy) alone, then while the
flood tenant keeps `--flooders` requests in flight, first with no limit on it and then with a
`max_concurrent_requests` quota of 4. Prints a table and writes
benchmarks/results/tenant_flood.json; the target is the quiet p99 within 1.5x of its alone value.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: reuse the serving benchmark's helpers

from benchmarks.harness import KEY, MODEL, percentile, start_server  # noqa: E402


def admin(url: str, method: str, path: str, body: dict | None = None) -> dict:
    resp = httpx.request(method, f"{url}{path}", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    resp.raise_for_status()
    return dict(resp.json())


def ask(url: str, key: str, max_tokens: int, question: str) -> tuple[int, float]:
    body = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": question}],
    }
    start = time.perf_counter()
    resp = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=600)
    return resp.status_code, time.perf_counter() - start


def quiet_latencies(url: str, key: str, n: int, max_tokens: int) -> list[float]:
    out = []
    for i in range(n):
        status, seconds = ask(url, key, max_tokens, f"Name a color and a number, request {i}.")
        assert status == 200, status
        out.append(seconds)
    return out


def measure(url: str, quiet: str, flood: str | None, args: argparse.Namespace) -> dict:
    stop = threading.Event()
    refused = served = 0
    lock = threading.Lock()

    def flooder(i: int) -> None:
        nonlocal refused, served
        while not stop.is_set():
            status, _ = ask(url, flood or "", args.max_tokens, f"Write a sentence about the sea, {i}.")
            with lock:
                if status == 429:
                    refused += 1
                else:
                    served += 1
            if status == 429:
                time.sleep(0.2)

    threads = [threading.Thread(target=flooder, args=(i,), daemon=True) for i in range(args.flooders if flood else 0)]
    for t in threads:
        t.start()
    time.sleep(3 if flood else 0)
    latencies = quiet_latencies(url, quiet, args.requests, args.max_tokens)
    stop.set()
    for t in threads:
        t.join(timeout=600)
    return {
        "p50_s": percentile(latencies, 0.5),
        "p99_s": percentile(latencies, 0.99),
        "flood_served": served,
        "flood_refused_429": refused,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flooders", type=int, default=24)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    args = parser.parse_args()
    proc, url = start_server(args.home)
    try:
        for tenant in ("quiet", "flood"):
            try:
                admin(url, "POST", "/v1/admin/tenants", {"id": tenant})
            except httpx.HTTPStatusError:
                admin(url, "PATCH", f"/v1/admin/tenants/{tenant}", {"limits": {}})
        quiet = admin(url, "POST", "/v1/admin/keys", {"name": "bench", "tenant": "quiet"})["key"]
        flood = admin(url, "POST", "/v1/admin/keys", {"name": "bench", "tenant": "flood"})["key"]
        ask(url, quiet, 4, "warm up")
        rows = {
            "quiet alone": measure(url, quiet, None, args),
            f"flood of {args.flooders}, no quota": measure(url, quiet, flood, args),
        }
        admin(url, "PATCH", "/v1/admin/tenants/flood", {"limits": {"max_concurrent_requests": 4}})
        time.sleep(6)  # the API caches tenant limits for 5 s
        rows[f"flood of {args.flooders}, quota 4 concurrent"] = measure(url, quiet, flood, args)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    alone = rows["quiet alone"]["p99_s"]
    print(f"{'quiet tenant while':38} {'p50':>7} {'p99':>7} {'p99 x alone':>11} {'flood ok':>8} {'flood 429':>9}")
    for name, r in rows.items():
        r["p99_ratio"] = r["p99_s"] / alone
        print(
            f"{name:38} {r['p50_s']:6.2f}s {r['p99_s']:6.2f}s {r['p99_ratio']:11.2f} {r['flood_served']:8d} "
            f"{r['flood_refused_429']:9d}"
        )
    out = ROOT / "benchmarks" / "results" / "tenant_flood.json"
    out.write_text(json.dumps({"model": MODEL, "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
