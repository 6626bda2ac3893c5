"""What recording the Prometheus metrics costs per request, measured on its own.

    python benchmarks/metrics_overhead.py

The serving benchmark's ``llmos`` and ``llmos-no-metrics`` rows (benchmarks/serve.py) compare
whole servers, which needs a quiet machine; this measures the two costs metrics add to a request,
in this process, best of several repeats (so other load on the machine inflates it less):
- a generation's metrics (``monitoring/requests.py``): created, one ``observe`` per delta
  (64 deltas of one token), closed, against the same loop without them;
- the HTTP middleware (``monitoring/http.py``) around a trivial ASGI app, against the app alone.
Writes benchmarks/results/metrics_overhead-<date>-<commit>.json.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import write_result
from llmos.engine.protocol import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelHandle,
    ModelInfo,
    SamplingParams,
)
from llmos.monitoring.http import HttpMetricsMiddleware
from llmos.monitoring.requests import GenerationMetrics

DELTAS = 64
REPEATS = 7


def best_of(run: Callable[[], None], count: int) -> float:
    """Seconds per call of ``run``, the best of ``REPEATS`` runs of ``count`` calls."""
    best = float("inf")
    for _ in range(REPEATS):
        start = time.perf_counter()
        for _ in range(count):
            run()
        best = min(best, (time.perf_counter() - start) / count)
    return best


def generation_cost() -> dict[str, float]:
    info = ModelInfo(name="bench-model", task="chat", context_length=2048, has_chat_template=True)
    request = GenerationRequest(
        "bench", "bench-model", list(range(40)), SamplingParams(max_tokens=DELTAS), handle=ModelHandle("b", info)
    )
    deltas = [GenerationDelta(index=0, text="a", token_ids=(5,)) for _ in range(DELTAS - 1)]
    deltas.append(GenerationDelta(index=0, text="a", token_ids=(5,), finish_reason=FinishReason.LENGTH))

    def plain() -> None:
        tokens = 0
        for delta in deltas:
            tokens += len(delta.token_ids)

    def observed() -> None:
        metrics = GenerationMetrics(request)
        tokens = 0
        for delta in deltas:
            metrics.observe(delta)
            tokens += len(delta.token_ids)
        metrics.close()

    extra = best_of(observed, 2000) - best_of(plain, 2000)
    return {"request_us": extra * 1e6, "per_delta_us": extra * 1e6 / DELTAS}


def middleware_cost() -> float:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: Any) -> None:
        return None

    wrapped = HttpMetricsMiddleware(app)
    scope = {"type": "http", "path": "/v1/chat/completions", "method": "POST"}
    loop = asyncio.new_event_loop()
    try:
        with_mw = best_of(lambda: loop.run_until_complete(wrapped(dict(scope), receive, send)), 5000)
        without = best_of(lambda: loop.run_until_complete(app(dict(scope), receive, send)), 5000)
    finally:
        loop.close()
    return (with_mw - without) * 1e6


def main() -> None:
    generation = generation_cost()
    http_us = middleware_cost()
    print(f"generation metrics: {generation['request_us']:.1f} us a request of {DELTAS} deltas", end="")
    print(f" ({generation['per_delta_us']:.2f} us a delta)")
    print(f"HTTP middleware: {http_us:.1f} us a request")
    write_result("metrics_overhead", {"deltas": DELTAS, **generation, "http_middleware_us": http_us})


if __name__ == "__main__":
    main()
