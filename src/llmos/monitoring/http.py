"""HTTP request metrics, as plain ASGI middleware (no web framework imported here).

Each request is counted by method, route template and status, and its duration observed from
arrival to the end of its response body. The route is the template the router matched
(``/v1/models/{model}``), never the raw path, so the label set is the route table's; a path that
matched no route is ``unmatched``. An error response's OpenAI ``code`` is read from its body
(small, and only when the status is 400 or more) and counted in ``llmos_request_errors_total``,
so every error is counted once, wherever it was raised.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from llmos.monitoring import metrics

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

UNMATCHED = "unmatched"
_ERROR_BODY_LIMIT = 8192
"""Error bodies are a few hundred bytes; a larger one is not read for its code."""
_SKIPPED = frozenset({"/metrics"})
"""Scrapes are not requests of the platform's users: counting them would move the numbers they read."""


def route_of(scope: Scope) -> str:
    """The route template the router matched for this request (it sets ``scope["route"]``)."""
    route = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


def error_code(body: bytes, status: int) -> str:
    """The OpenAI error ``code`` of an error body, else its ``type``, else ``http_<status>``."""
    try:
        error = json.loads(body).get("error") if body else None
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        for field in ("code", "type"):
            value = error.get(field)
            if isinstance(value, str) and value and len(value) <= 64:
                return value
    return f"http_{status}"


def count_error(code: str | None) -> None:
    """An error that reached its client other than as an error response (a stream's last event)."""
    metrics.REQUEST_ERRORS.labels(code or "error").inc()


class HttpMetricsMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in _SKIPPED:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app fails before it answers, the server answers 500
        error_body: bytearray | None = None
        recorded = False

        def record() -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            method, route = scope.get("method", "GET"), route_of(scope)
            metrics.HTTP_REQUESTS.labels(method, route, str(status)).inc()
            metrics.HTTP_REQUEST_DURATION.labels(method, route).observe(time.perf_counter() - started)
            if status >= 400:
                metrics.REQUEST_ERRORS.labels(error_code(bytes(error_body or b""), status)).inc()

        async def send_and_observe(message: Message) -> None:
            nonlocal status, error_body
            if message["type"] == "http.response.start":
                status = int(message["status"])
                if status >= 400:
                    error_body = bytearray()
            elif message["type"] == "http.response.body":
                if error_body is not None and len(error_body) < _ERROR_BODY_LIMIT:
                    error_body += message.get("body", b"")
                if not message.get("more_body", False):
                    await send(message)
                    record()
                    return
            await send(message)

        try:
            await self.app(scope, receive, send_and_observe)
        finally:
            record()  # also a response cut short by its client going away
