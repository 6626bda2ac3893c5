"""Overload: twice the rated concurrency at once. Is the excess refused fast, and does nothing admitted fail?

    python benchmarks/overload.py [--rated 8] [--rounds 3] [--max-tokens 32]

Starts a real server (`llmos serve`, loopback only, a temporary data directory, SmolLM2) and
fires ``2 x rated`` non-streaming chat requests at the same instant, ``--rounds`` times, in two
set-ups:

- engine admission: ``max_pending_requests = rated``; the excess gets 503 ``overloaded``;
- tenant quota: a tenant with ``max_concurrent_requests = rated``; the excess gets 429.

Reports, per set-up: admitted requests and their success rate (target 100%), refusals by status,
refusal latency p50/p99 (target under 100 ms) and whether every refusal carried Retry-After.
Prints a table and writes a new benchmarks/results/overload-<date>-<commit>.json. The model is copied from the
benchmark home (.cache/bench-home, filled by serve.py) when it is there, otherwise
pulled from its catalog source.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: reuse the serving benchmark's helpers

from benchmarks.harness import KEY, MODEL, percentile, write_result  # noqa: E402


def prepare_home(home: Path, source_home: Path) -> None:
    """Register the model in ``home``: a local copy of the benchmark home's, else the catalog source."""
    from llmos.config import Settings
    from llmos.platform import Platform

    ref = MODEL
    if (source_home / "llmos.db").is_file():
        source = Platform.open(Settings(home=source_home))
        try:
            ref = f"file:{source.registry.model_dir(source.registry.get(MODEL))}"
        except Exception:  # not pulled there: fall back to the catalog
            pass
        finally:
            source.close()
    platform = Platform.open(Settings(home=home))
    try:
        platform.registry.pull(ref, name=MODEL)
    finally:
        platform.close()


def start_server(home: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "LLMOS_HOME": str(home),
        "LLMOS_ADMIN_KEY": KEY,
        "LLMOS_PORT": str(port),
        "LLMOS_MAX_CONCURRENT_JOBS": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        **env_extra,
    }
    log = (home / "server.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmos", "serve", "--no-pull"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit(f"server did not start; see {home / 'server.log'}")


def burst(url: str, key: str, n: int, max_tokens: int) -> list[dict[str, Any]]:
    """``n`` chat requests released at the same instant, each on its own warm connection."""
    barrier = threading.Barrier(n)
    results: list[dict[str, Any]] = [{} for _ in range(n)]

    def one(i: int) -> None:
        body = {
            "model": MODEL,
            "max_tokens": max_tokens,
            "temperature": 0,
            "messages": [{"role": "user", "content": f"Write one sentence about the number {i}."}],
        }
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
            client.get("/health")  # connection open before the start line
            barrier.wait()
            start = time.perf_counter()
            resp = client.post("/v1/chat/completions", json=body)
            seconds = time.perf_counter() - start
        ok_body = resp.status_code == 200 and bool(resp.json()["choices"][0]["message"]["content"] is not None)
        error = resp.json().get("error", {}) if resp.status_code != 200 else {}
        results[i] = {
            "status": resp.status_code,
            "seconds": seconds,
            "ok": ok_body,
            "retry_after": resp.headers.get("retry-after"),
            "code": error.get("code"),
        }

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summarize(results: list[dict[str, Any]], rated: int) -> dict[str, Any]:
    refused = [r for r in results if r["status"] in (429, 503)]
    admitted = [r for r in results if r["status"] not in (429, 503)]
    by_status: dict[str, int] = {}
    for r in refused:
        by_status[str(r["status"])] = by_status.get(str(r["status"]), 0) + 1
    latencies = [r["seconds"] for r in refused]
    return {
        "rated_concurrency": rated,
        "fired": len(results),
        "admitted": len(admitted),
        "admitted_succeeded": sum(1 for r in admitted if r["ok"]),
        "admitted_success_rate": sum(1 for r in admitted if r["ok"]) / len(admitted) if admitted else None,
        "admitted_statuses": sorted({r["status"] for r in admitted}),
        "refused": len(refused),
        "refused_by_status": by_status,
        "refused_codes": sorted({str(r["code"]) for r in refused}),
        "refusal_p50_ms": percentile(latencies, 0.5) * 1000 if latencies else None,
        "refusal_p99_ms": percentile(latencies, 0.99) * 1000 if latencies else None,
        "refusal_max_ms": max(latencies) * 1000 if latencies else None,
        "retry_after_on_every_refusal": all(r["retry_after"] for r in refused),
        "admitted_latency_p50_s": percentile([r["seconds"] for r in admitted], 0.5) if admitted else None,
    }


def run_setup(home: Path, env_extra: dict[str, str], tenant_limits: dict[str, int] | None, args: Any) -> dict:
    proc, url = start_server(home, env_extra)
    try:
        key = KEY
        if tenant_limits is not None:
            admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            name = f"burst-{int(time.time())}"
            admin.post("/v1/admin/tenants", json={"id": name, "limits": tenant_limits}).raise_for_status()
            created = admin.post("/v1/admin/keys", json={"name": name, "tenant": name, "scopes": ["inference"]})
            created.raise_for_status()
            key = created.json()["key"]
        burst(url, key, 1, 4)  # load the model before the measured bursts
        results: list[dict[str, Any]] = []
        for _ in range(args.rounds):
            results += burst(url, key, 2 * args.rated, args.max_tokens)
        return summarize(results, args.rated)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rated", type=int, default=8, help="Rated concurrency; twice this is fired at once.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--source-home", type=Path, default=ROOT / ".cache" / "bench-home")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="llmos-overload-") as tmp:
        home = Path(tmp)
        prepare_home(home, args.source_home)
        rows = {
            "engine admission (max_pending_requests)": run_setup(
                home, {"LLMOS_MAX_PENDING_REQUESTS": str(args.rated)}, None, args
            ),
            "tenant quota (max_concurrent_requests)": run_setup(
                home, {}, {"max_concurrent_requests": args.rated}, args
            ),
        }

    header = (
        f"{'set-up':42} {'fired':>6} {'admitted':>9} {'ok %':>6} {'refused':>8} {'by status':>14} "
        f"{'p50 ms':>7} {'p99 ms':>7} {'Retry-After':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        statuses = ",".join(f"{k}:{v}" for k, v in sorted(r["refused_by_status"].items())) or "-"
        rate = f"{r['admitted_success_rate'] * 100:6.1f}" if r["admitted_success_rate"] is not None else f"{'-':>6}"
        p50 = f"{r['refusal_p50_ms']:7.1f}" if r["refusal_p50_ms"] is not None else f"{'-':>7}"
        p99 = f"{r['refusal_p99_ms']:7.1f}" if r["refusal_p99_ms"] is not None else f"{'-':>7}"
        retry = "all" if r["retry_after_on_every_refusal"] else "MISSING"
        print(
            f"{name:42} {r['fired']:6d} {r['admitted']:9d} {rate} {r['refused']:8d} {statuses:>14} {p50} {p99} "
            f"{retry:>12}"
        )
    result = {
        "model": MODEL,
        "rated_concurrency": args.rated,
        "fired_per_round": 2 * args.rated,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "targets": {"admitted_success_rate": 1.0, "refusal_p99_ms": 100},
        "rows": rows,
    }
    write_result("overload", result)


if __name__ == "__main__":
    main()
