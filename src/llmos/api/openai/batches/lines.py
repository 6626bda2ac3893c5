"""A batch's line answered as the endpoint it names would answer it: the same request schemas,
the same services and the same errors, with its generation at background priority."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from llmos.api.context import RequestContext
from llmos.api.errors import invalid_body
from llmos.api.openai.chat.schemas import ChatCompletionRequest
from llmos.api.openai.chat.serving import ChatService
from llmos.api.openai.common import StrictModel
from llmos.api.openai.completions.schemas import CompletionRequest
from llmos.api.openai.completions.serving import CompletionService
from llmos.api.openai.embeddings.schemas import EmbeddingRequest
from llmos.api.openai.embeddings.serving import create_embeddings
from llmos.api.openai.moderations.serving import chat_moderator, guard_chat
from llmos.config import Settings
from llmos.engine.protocol import EngineClient
from llmos.errors import InvalidRequestError

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
SCHEMAS: dict[str, type[StrictModel]] = {
    CHAT: ChatCompletionRequest,
    COMPLETIONS: CompletionRequest,
    EMBEDDINGS: EmbeddingRequest,
}


def parse_body(url: str, body: dict[str, Any]) -> StrictModel:
    """``body`` as its endpoint's request (checked as the endpoint checks its JSON body), or the
    400 the endpoint would answer."""
    try:
        request = SCHEMAS[url].model_validate_json(json.dumps(body))
    except ValidationError as exc:
        raise invalid_body(exc.errors()) from exc
    if getattr(request, "stream", False):
        raise InvalidRequestError("a batch's requests cannot stream", param="stream")
    return request


def check_body(url: str, body: dict[str, Any]) -> None:
    """The files API's check of a batch file's line (``training.batches.BodyCheck``)."""
    parse_body(url, body)


Handler = Callable[[Any, EngineClient, Settings, RequestContext], Awaitable[BaseModel]]


async def _chat(req: ChatCompletionRequest, engine: EngineClient, settings: Settings, ctx: RequestContext) -> BaseModel:
    service = ChatService(engine, settings, ctx)
    gen = await service.prepare(req)
    moderator = await chat_moderator(engine, settings, ctx)  # a tenant's policy binds its batches too
    if moderator is not None:
        await guard_chat(moderator, req, service)
    return await service.complete(req, dataclasses.replace(gen, background=True))


async def _completions(
    req: CompletionRequest, engine: EngineClient, settings: Settings, ctx: RequestContext
) -> BaseModel:
    service = CompletionService(engine, settings, ctx)
    gens = await service.prepare(req)
    return await service.complete(req, [(text, dataclasses.replace(gen, background=True)) for text, gen in gens])


async def _embeddings(
    req: EmbeddingRequest, engine: EngineClient, settings: Settings, ctx: RequestContext
) -> BaseModel:
    result = await create_embeddings(req, engine, settings, ctx)
    ctx.finish(req.model, result.usage.prompt_tokens, 0)
    return result


HANDLERS: dict[str, Handler] = {CHAT: _chat, COMPLETIONS: _completions, EMBEDDINGS: _embeddings}


async def answer(url: str, body: dict[str, Any], engine: EngineClient, settings: Settings, ctx: RequestContext) -> Any:
    """The endpoint's response body for one line; its errors (LLMOSError) propagate as they would
    to a client, for the runner to record with their status."""
    return (await HANDLERS[url](parse_body(url, body), engine, settings, ctx)).model_dump(mode="json")
