from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from llmos.api.deps import EngineDep, InferenceKey, SettingsDep
from llmos.api.openai.chat.schemas import ChatCompletion, ChatCompletionRequest
from llmos.api.openai.chat.serving import ChatService
from llmos.api.sse import EventStreamResponse

router = APIRouter(tags=["chat"])


@router.post(
    "/v1/chat/completions", response_model=ChatCompletion, responses={200: {"content": {"text/event-stream": {}}}}
)
async def create_chat_completion(
    body: ChatCompletionRequest, engine: EngineDep, settings: SettingsDep, _key: InferenceKey
) -> Any:
    service = ChatService(engine, settings)
    gen = await service.prepare(body)
    if body.stream:
        return EventStreamResponse(service.stream(body, gen))
    return (await service.complete(body, gen)).dump()
