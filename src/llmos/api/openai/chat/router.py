from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from llmos.api.context import ChatContext
from llmos.api.deps import EngineDep, SettingsDep
from llmos.api.openai.chat.schemas import ChatCompletion, ChatCompletionRequest
from llmos.api.openai.chat.serving import ChatService
from llmos.api.openai.common import respond_while_connected
from llmos.api.openai.moderations.serving import chat_moderator, guard_chat
from llmos.api.sse import EventStreamResponse

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions", response_model=ChatCompletion, responses={200: {"content": {"text/event-stream": {}}}}
)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, engine: EngineDep, settings: SettingsDep, ctx: ChatContext
) -> Any:
    service = ChatService(engine, settings, ctx)
    gen = await service.prepare(body)
    moderator = await chat_moderator(engine, settings, ctx)
    if moderator is not None:
        await guard_chat(moderator, body, service)
    if body.stream:
        ctx.handed_off = True
        return EventStreamResponse(service.stream(body, gen))
    return await respond_while_connected(request, service.complete(body, gen))
