from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from llmos.api.context import CompletionContext
from llmos.api.deps import EngineDep, SettingsDep
from llmos.api.openai.common import respond_while_connected
from llmos.api.openai.completions.schemas import Completion, CompletionRequest
from llmos.api.openai.completions.serving import CompletionService
from llmos.api.sse import EventStreamResponse
from llmos.errors import InvalidRequestError

router = APIRouter(tags=["completions"])


@router.post("/v1/completions", response_model=Completion, responses={200: {"content": {"text/event-stream": {}}}})
async def create_completion(
    body: CompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep, ctx: CompletionContext
) -> Any:
    service = CompletionService(engine, settings, ctx)
    if body.stream and len(body.prompts()) != 1:
        raise InvalidRequestError("streaming supports one prompt per request", param="prompt")
    gens = await service.prepare(body)
    if body.stream:
        ctx.handed_off = True
        return EventStreamResponse(service.stream(body, *gens[0]))
    return await respond_while_connected(request, service.complete(body, gens))
