"""Host header check against DNS rebinding: a server bound to loopback answers only requests
addressed to a loopback name, so a web page on evil.example that resolves to 127.0.0.1
cannot drive it from a victim's browser."""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Receive, Scope, Send

from llmos.api.errors import error_body

LOOPBACK_BINDS = frozenset({"127.0.0.1", "localhost", "::1"})
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "[::1]", "::1"})


def allowed_hosts_for(bind_host: str, configured: list[str]) -> frozenset[str] | None:
    """The Host names to accept, or None for any (bound beyond loopback with nothing configured)."""
    if configured:
        return frozenset(h.lower() for h in configured)
    return LOOPBACK_NAMES if bind_host in LOOPBACK_BINDS else None


def host_name(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8000
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheckMiddleware:
    def __init__(self, app: ASGIApp, *, allowed: frozenset[str]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = dict(scope.get("headers", []))
            name = host_name(headers.get(b"host", b"").decode("latin-1"))
            if name not in self.allowed:
                body = json.dumps(
                    error_body("Invalid Host header.", "invalid_request_error", None, "invalid_host")
                ).encode()
                await send(
                    {
                        "type": "http.response.start",
                        "status": 400,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)
