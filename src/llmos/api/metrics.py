"""GET /metrics (Prometheus text format) and the last hour's series for the console.

/metrics needs a key with the ``metrics`` scope (``admin`` grants every scope) unless
``metrics_public`` opens it to a Prometheus server on a trusted network; with
``metrics_enabled = false`` nothing is recorded and both routes answer 404.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from llmos.api.deps import get_settings, require
from llmos.errors import NotFoundError
from llmos.monitoring.sampler import MetricsSampler
from llmos.security import ApiKeyInfo

router = APIRouter(tags=["metrics"])
_require_metrics = require("metrics")


def metrics_reader(request: Request) -> ApiKeyInfo | None:
    """The caller's key, checked for the ``metrics`` scope, unless ``metrics_public``."""
    if get_settings(request).metrics_public:
        return None
    return _require_metrics(request)


metrics_reader.required_scope = "metrics"  # type: ignore[attr-defined]
MetricsReader = Annotated[ApiKeyInfo | None, Depends(metrics_reader)]
MetricsKey = Annotated[ApiKeyInfo, Depends(_require_metrics)]


def _sampler(request: Request) -> MetricsSampler:
    sampler: MetricsSampler | None = getattr(request.app.state, "metrics_sampler", None)
    if sampler is None:
        raise NotFoundError("metrics are turned off on this server (metrics_enabled = false)")
    return sampler


@router.get("/metrics", response_class=Response)
async def scrape(request: Request, _key: MetricsReader) -> Response:
    """Every metric in the Prometheus text format, the gauges sampled right now."""
    sampler = _sampler(request)
    await asyncio.to_thread(sampler.sample)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/admin/metrics/history")
async def history(request: Request, _key: MetricsKey) -> dict[str, Any]:
    """The last hour, one point every ``metrics_sample_interval_s``: throughput, request and error
    rates, mean latencies, queue, cache use and running jobs (oldest first)."""
    sampler = _sampler(request)
    return {"object": "list", "interval_s": sampler.interval_s, "data": sampler.history()}
