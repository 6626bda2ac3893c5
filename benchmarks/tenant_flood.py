"""One tenant floods the server; how much slower does another tenant's traffic get?

    python benchmarks/tenant_flood.py [--flooders 24] [--requests 12] [--max-tokens 32]

Runs a real server (`llmos serve`, SmolLM2), creates tenants `quiet` and `flood`, and measures
the quiet tenant's request latency (p50/p99, non-streaming chat, greedy) alone, then while the
flood tenant keeps `--flooders` requests in flight: on a server with the batch share turned off
(`tenant_rows_when_shared = 0`), with the default share, and with the default share plus a
`max_concurrent_requests` quota of 4 on the flood tenant. Prints a table and writes
benchmarks/results/tenant_flood-<date>-<commit>.json; the target is the quiet p99 within 1.5x of its alone value.

The flood's clients run in a separate process at the lowest CPU priority (nice 19): on a real
deployment they are other machines, while here they would otherwise take one of the server's two
cores. They back off as the `Retry-After` of a 429 says, as the official clients do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: reuse the serving benchmark's helpers

from benchmarks.harness import KEY, MODEL, percentile, start_server, write_result  # noqa: E402


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


def flood_worker(url: str, key: str, flooders: int, max_tokens: int) -> None:
    """Keep ``flooders`` requests in flight until stdin closes; print served and refused counts."""
    os.nice(19)
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    counts = {"served": 0, "refused": 0}
    lock = threading.Lock()

    def flooder(i: int) -> None:
        with httpx.Client(timeout=600) as client:
            while not stop.is_set():
                body = {
                    "model": MODEL,
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": f"Write a sentence about the sea, {i}."}],
                }
                resp = client.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
                with lock:
                    counts["refused" if resp.status_code == 429 else "served"] += 1
                if resp.status_code == 429:
                    time.sleep(float(resp.headers.get("retry-after", "1")))

    threads = [threading.Thread(target=flooder, args=(i,)) for i in range(flooders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps(counts), flush=True)


def measure(url: str, quiet: str, flood: str | None, args: argparse.Namespace) -> dict:
    worker = None
    if flood:
        command = [sys.executable, __file__, "--flood-worker", url, flood, str(args.flooders), str(args.max_tokens)]
        worker = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        time.sleep(3)  # the flood fills the batch first
    latencies = quiet_latencies(url, quiet, args.requests, args.max_tokens)
    counts = {"served": 0, "refused": 0}
    if worker is not None:
        out, _ = worker.communicate(input="", timeout=600)  # closing stdin stops the flood
        counts = json.loads(out.strip().splitlines()[-1])
    return {
        "p50_s": percentile(latencies, 0.5),
        "p99_s": percentile(latencies, 0.99),
        "flood_served": counts["served"],
        "flood_refused_429": counts["refused"],
    }


def setup_tenants(url: str) -> tuple[str, str]:
    for tenant in ("quiet", "flood"):
        try:
            admin(url, "POST", "/v1/admin/tenants", {"id": tenant})
        except httpx.HTTPStatusError:
            admin(url, "PATCH", f"/v1/admin/tenants/{tenant}", {"limits": {}})
    quiet = admin(url, "POST", "/v1/admin/keys", {"name": "bench", "tenant": "quiet"})["key"]
    flood = admin(url, "POST", "/v1/admin/keys", {"name": "bench", "tenant": "flood"})["key"]
    ask(url, quiet, 4, "warm up")
    return quiet, flood


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--flood-worker":
        url, key, flooders, max_tokens = sys.argv[2:6]
        flood_worker(url, key, int(flooders), int(max_tokens))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flooders", type=int, default=24)
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    args = parser.parse_args()
    rows: dict[str, dict] = {}
    for share in ("0", None):  # the batch share off, then the default
        proc, url = start_server(args.home, env={"LLMOS_TENANT_ROWS_WHEN_SHARED": share} if share else None)
        try:
            quiet, flood = setup_tenants(url)
            if share:
                rows["quiet alone"] = measure(url, quiet, None, args)
                rows[f"flood of {args.flooders}, batch share off"] = measure(url, quiet, flood, args)
                continue
            rows[f"flood of {args.flooders}, batch share (default)"] = measure(url, quiet, flood, args)
            admin(url, "PATCH", "/v1/admin/tenants/flood", {"limits": {"max_concurrent_requests": 4}})
            time.sleep(6)  # the API caches tenant limits for 5 s
            rows[f"flood of {args.flooders}, share + quota 4 concurrent"] = measure(url, quiet, flood, args)
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
    write_result("tenant_flood", {"model": MODEL, "rows": rows})


if __name__ == "__main__":
    main()
