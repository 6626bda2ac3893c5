"""Edge limits applied before any handler runs: body size (413) and JSON nesting depth (400)."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos.api.errors import error_body


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """True if brackets nest deeper than ``limit`` (strings and escapes skipped, linear time)."""
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """JSON bodies are read whole (up to ``max_bytes``) and checked for depth before the app sees
    them; uploads (multipart) stream through, counted against ``max_upload_bytes``, so a large
    file is never held in memory and an oversized one is cut off with 413 as soon as it is."""

    def __init__(self, app: ASGIApp, *, max_bytes: int, max_json_depth: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_json_depth = max_json_depth
        self.max_upload_bytes = max_upload_bytes

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
            await self._buffered(scope, receive, send, headers)

    async def _stream(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        size = 0
        exceeded = replied = False

        async def counted() -> Message:
            nonlocal size, exceeded
            message = await receive()
            if message["type"] == "http.request":
                size += len(message.get("body", b""))
                if size > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            nonlocal replied
            if not exceeded:
                await send(message)
            elif not replied and message["type"] == "http.response.start":
                replied = True  # whatever the app made of the cut-off body, the answer is 413
                await _reply(send, 413, f"Upload exceeds the limit of {limit} bytes.", "payload_too_large")

        with contextlib.suppress(_TooLarge):
            await self.app(scope, counted, guarded)
        if exceeded and not replied:
            await _reply(send, 413, f"Upload exceeds the limit of {limit} bytes.", "payload_too_large")

    async def _buffered(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes]) -> None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
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
        if b"json" in headers.get(b"content-type", b"") and json_depth_exceeds(body, self.max_json_depth):
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
