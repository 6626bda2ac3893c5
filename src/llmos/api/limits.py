"""Edge limits applied before any handler runs: body size (413), body read time (408) and JSON
nesting depth (400)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos.api.errors import error_body
from llmos.registry.formats import json_depth_exceeds


class _CutOff(Exception):
    """Raised into the app from ``receive``: the body is refused, the middleware gives the answer."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class BodyLimitMiddleware:
    """Bodies are read whole (up to ``max_bytes``) and checked for JSON depth, whatever their
    declared type, before the app sees them; uploads (multipart) stream through, counted against
    ``max_upload_bytes``, so a large file is never held in memory and an oversized one is cut off
    with 413 as soon as it is. A client that sends nothing of its body for ``body_timeout_s`` gets
    408, so slow senders cannot hold handlers and connections."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, max_json_depth: int, max_upload_bytes: int, body_timeout_s: float
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_json_depth = max_json_depth
        self.max_upload_bytes = max_upload_bytes
        self.body_timeout_s = body_timeout_s

    async def _receive_body(self, receive: Receive) -> Message:
        try:
            return await asyncio.wait_for(receive(), self.body_timeout_s)
        except TimeoutError:
            raise _CutOff(
                408, f"No part of the request body arrived for {self.body_timeout_s:g} s.", "request_timeout"
            ) from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        upload = headers.get(b"content-type", b"").startswith(b"multipart/form-data")
        limit = self.max_upload_bytes if upload else self.max_bytes
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await _reply(send, 413, f"Request body exceeds the limit of {limit} bytes.", "payload_too_large")
            return
        if upload:
            await self._stream(scope, receive, send, limit)
        else:
            await self._buffered(scope, receive, send)

    async def _stream(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        size = 0
        cut: _CutOff | None = None
        replied = False

        async def counted() -> Message:
            nonlocal size, cut
            try:
                message = await self._receive_body(receive)
            except _CutOff as exc:
                cut = exc
                raise
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    cut = _CutOff(413, f"Upload exceeds the limit of {limit} bytes.", "payload_too_large")
                    raise cut
            return message

        async def guarded(message: Message) -> None:
            nonlocal replied
            if cut is None:
                await send(message)
            elif not replied and message["type"] == "http.response.start":
                replied = True  # whatever the app made of the cut-off body, the answer is the cut's
                await _reply(send, cut.status, cut.message, cut.code)

        with contextlib.suppress(_CutOff):
            await self.app(scope, counted, guarded)
        if cut is not None and not replied:
            await _reply(send, cut.status, cut.message, cut.code)

    async def _buffered(self, scope: Scope, receive: Receive, send: Send) -> None:
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await self._receive_body(receive)
            except _CutOff as cut:
                await _reply(send, cut.status, cut.message, cut.code)
                return
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _reply(
                    send, 413, f"Request body exceeds the limit of {self.max_bytes} bytes.", "payload_too_large"
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # Whatever the declared content type: a handler may parse any body as JSON.
        if json_depth_exceeds(body, self.max_json_depth):
            await _reply(send, 400, f"JSON nesting deeper than {self.max_json_depth} levels.", "json_too_deep")
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _reply(send: Send, status: int, message: str, code: str) -> None:
    payload: Any = error_body(message, "invalid_request_error", None, code)
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})
