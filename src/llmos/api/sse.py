"""Responses that stop their work the moment the client goes away: server-sent events, and
the disconnect watch that plain (JSON) responses share with them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

SSE_DONE = "data: [DONE]\n\n"
CLIENT_CLOSED_REQUEST = 499
"""The status logged for a request whose client left before its answer (nginx's convention)."""


def sse_event(payload: BaseModel | dict[str, Any], *, exclude: set[str] | None = None) -> str:
    """One event carrying ``payload`` as compact JSON (a model's fields in ``exclude`` left out)."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json(exclude=exclude)}\n\n"
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class ClientDisconnected(Exception):
    """The client went away before its response was complete; the work for it was cancelled."""


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """``work``'s result, unless the client disconnects first: then ``work`` is cancelled (its
    ``finally`` blocks run, so an engine request is aborted and charged) and ClientDisconnected
    is raised. ``work``'s own exceptions propagate as they are."""
    outcome: list[T] = []
    failure: list[Exception] = []
    async with anyio.create_task_group() as group:

        async def run() -> None:
            try:
                outcome.append(await work)
            except Exception as exc:  # raised below, outside the task group, so not as an ExceptionGroup
                failure.append(exc)
            finally:
                group.cancel_scope.cancel()

        async def watch() -> None:
            # The request body has been read, so the next ASGI message can only be the disconnect.
            while (await receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(run)
        group.start_soon(watch)
    if failure:
        raise failure[0]
    if not outcome:
        raise ClientDisconnected
    return outcome[0]


class EventStreamResponse(StreamingResponse):
    """Streams ``body`` and, whatever the ASGI spec version, watches for the client's disconnect:
    the stream task is cancelled at once and the body generator closed, which aborts the request
    in the engine (its ``finally`` runs), so no token is computed for a client that has gone."""

    def __init__(self, body: AsyncIterator[str]) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._body = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await until_disconnect(receive, self.stream_response(send))
        except (ClientDisconnected, OSError):
            pass
        finally:
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
