"""The HTTP server `llmos serve` runs: uvicorn, set up so that slow or idle clients cannot hold it.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and, with its h11 parser, the
size of a request head (``h11_max_incomplete_event_size``). It has no limit on how long a request
head may take to arrive, and its own connection cap (``limit_concurrency``) answers only once a
request head is complete, in plain text; ``GuardedProtocol`` adds the first and refuses a
connection beyond ``http_max_connections`` as soon as it opens, with a 503 in the API's error
shape, so its descriptor is freed at once. Body read time is bounded by the app's edge middleware
(``api/limits.py``). The ``server`` header is left out: it would name the stack.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from llmos.api.errors import error_body
from llmos.config import Settings

_BUSY = json.dumps(
    error_body("The server has too many open connections; retry shortly.", "server_error", None, "overloaded")
).encode()
_BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY
)


class GuardedProtocol(H11Protocol):
    """Refuses a connection beyond ``max_connections`` at once (503, closed), and closes one that has
    spent a whole ``head_timeout_s`` period without a request in progress: one that opened and never
    completed a request head (slow loris), or that trickles the next request's head after a response
    (uvicorn's keep-alive timer stops at its first byte)."""

    head_timeout_s = 10.0
    max_connections = 512
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_BUSY_RESPONSE)
            transport.close()
            return
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
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)


def server_config(app: Any, settings: Settings) -> uvicorn.Config:
    """uvicorn's configuration for ``app`` under ``settings`` (also what the tests run)."""
    limits = {"head_timeout_s": settings.http_header_timeout_s, "max_connections": settings.http_max_connections}
    protocol = type("LLMOSHttpProtocol", (GuardedProtocol,), limits)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=protocol,
        timeout_keep_alive=settings.http_keep_alive_s,
        limit_concurrency=settings.http_max_connections + 1,  # a backstop: GuardedProtocol refuses first
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
        server_header=False,
        date_header=True,
        timeout_graceful_shutdown=30,
    )
