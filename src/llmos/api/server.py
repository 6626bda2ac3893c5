"""The HTTP server `llmos serve` runs: uvicorn, set up so that slow or idle clients cannot hold it.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``), connections and requests at
once (``limit_concurrency``, 503 beyond) and, with its h11 parser, the size of a request head
(``h11_max_incomplete_event_size``); it has no limit on how long a request head may take to
arrive, so ``HeadTimeoutProtocol`` adds one. Body read time is bounded by the app's edge
middleware (``api/limits.py``). The ``server`` header is left out: it would name the stack.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmos.config import Settings


class HeadTimeoutProtocol(H11Protocol):
    """Closes a connection that has spent a whole ``head_timeout_s`` period without a request in
    progress: one that opened and never completed a request head (slow loris), or that trickles the
    next request's head after a response (uvicorn's keep-alive timer stops at its first byte)."""

    head_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watched_cycle: object = None
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._check_head)

    def _check_head(self) -> None:
        if self.transport.is_closing():
            return
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and self.cycle is self._watched_cycle:  # no new request for a whole period
            self.transport.close()
            return
        self._watched_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._check_head)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_timer.cancel()
        super().connection_lost(exc)


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` under ``settings`` (also what the tests run)."""
    protocol = type("LLMOSHttpProtocol", (HeadTimeoutProtocol,), {"head_timeout_s": settings.http_header_timeout_s})
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=protocol,
        timeout_keep_alive=settings.http_keep_alive_s,
        limit_concurrency=settings.http_max_connections,
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
        server_header=False,
        date_header=True,
        timeout_graceful_shutdown=30,
    )
