"""A generation request's metrics, observed as its deltas pass the one generation path.

``api/openai/common.py``'s ``engine_deltas`` is the path every chat and text completion takes,
whatever engine serves it, so the request-level metrics are taken there once: time to first
token and end-to-end latency from the request reaching the engine, the gaps between a choice's
deltas, why each choice finished, and its token counts. The queue time is the engine's own
(``engine/runner.py``), the gauges are sampled from its stats (``monitoring/sampler.py``).
"""

from __future__ import annotations

import time

from llmos.engine.protocol import FinishReason, GenerationDelta, GenerationRequest
from llmos.monitoring import metrics

_COUNTED_REASONS = frozenset({FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT})
"""A choice that failed is counted by ``llmos_request_errors_total`` instead."""


def model_label(request: GenerationRequest) -> str:
    """The bounded ``model_name`` of a request (``served_model_label``), ``unknown`` while unresolved."""
    if request.handle is None:
        return metrics.UNKNOWN_MODEL
    return served_model_label(request.model, request.handle.info.name)


def served_model_label(ref: str, name: str) -> str:
    """The ``model_name`` of a request for ``ref`` that resolved to a model called ``name``: the
    version ``name@N`` when ``ref`` names one, as every request an alias routes does
    (``ModelAliases.route``), so a canary's versions have series of their own; else the registered
    name (never an alias or an id as written). Capped by ``MODEL_NAMES``."""
    named, _, version = ref.rpartition("@")
    return metrics.MODEL_NAMES(ref if named == name and version.isdigit() else name)


class GenerationMetrics:
    """What one ``GenerationRequest`` adds to the metrics: ``observe`` each delta, ``close`` once
    however it ends (finished, failed, or its client gone: the unfinished choices count as aborted)."""

    __slots__ = (
        "first_seen",
        "generated",
        "inter_token",
        "last",
        "model",
        "prompt_tokens",
        "started",
        "tenant",
        "unfinished",
    )

    def __init__(self, request: GenerationRequest) -> None:
        self.model = model_label(request)
        self.tenant = request.tenant
        self.prompt_tokens = len(request.prompt_token_ids)
        self.generated = 0
        self.started = time.perf_counter()
        self.last: dict[int, float] = {}
        """When each choice's latest delta with tokens arrived."""
        self.unfinished = request.params.n
        self.first_seen = False
        self.inter_token = metrics.INTER_TOKEN_LATENCY.labels(self.model)  # looked up once, observed per delta

    def observe(self, delta: GenerationDelta) -> None:
        if delta.token_ids:
            now = time.perf_counter()
            if not self.first_seen:
                self.first_seen = True
                metrics.TIME_TO_FIRST_TOKEN.labels(self.model).observe(now - self.started)
            previous = self.last.get(delta.index)
            if previous is not None:
                self.inter_token.observe(now - previous)
            self.last[delta.index] = now
            self.generated += len(delta.token_ids)
        if delta.draft_tokens:
            metrics.SPEC_DECODE_DRAFT_TOKENS.labels(self.model).inc(delta.draft_tokens)
        if delta.accepted_draft_tokens:
            metrics.SPEC_DECODE_ACCEPTED_TOKENS.labels(self.model).inc(delta.accepted_draft_tokens)
        if delta.finish_reason is not None:
            self.unfinished -= 1
            if delta.finish_reason in _COUNTED_REASONS:
                metrics.REQUEST_SUCCESS.labels(self.model, delta.finish_reason.value).inc()

    def close(self) -> None:
        if self.unfinished > 0:  # the consumer stopped early: its client went away
            metrics.REQUEST_SUCCESS.labels(self.model, FinishReason.ABORT.value).inc(self.unfinished)
            self.unfinished = 0
        metrics.E2E_REQUEST_LATENCY.labels(self.model).observe(time.perf_counter() - self.started)
        metrics.REQUEST_PROMPT_TOKENS.labels(self.model).observe(self.prompt_tokens)
        metrics.REQUEST_GENERATION_TOKENS.labels(self.model).observe(self.generated)
        metrics.PROMPT_TOKENS.labels(self.model, self.tenant).inc(self.prompt_tokens)
        metrics.GENERATION_TOKENS.labels(self.model, self.tenant).inc(self.generated)
