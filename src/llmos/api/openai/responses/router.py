"""/v1/responses: create (whole or streamed), retrieve, delete, input_items; per tenant."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from llmos.api.context import RequestContext, admitted
from llmos.api.deps import EngineDep, InferenceKey, PlatformDep, SettingsDep
from llmos.api.openai.responses.schemas import CreateResponse
from llmos.api.openai.responses.serving import ResponsesService
from llmos.api.openai.vector_stores.serving import Retrieval
from llmos.api.sse import EventStreamResponse
from llmos.retrieval import records

router = APIRouter(tags=["responses"])
ResponseContext = Annotated[RequestContext, Depends(admitted("response"))]


@router.post("/v1/responses", responses={200: {"content": {"text/event-stream": {}}}})
async def create_response(
    body: CreateResponse, request: Request, engine: EngineDep, settings: SettingsDep, ctx: ResponseContext
) -> Any:
    service = ResponsesService(engine, settings, ctx, Retrieval(request, ctx.key))
    prepared = await service.prepare(body)
    if body.stream:
        ctx.handed_off = True
        return EventStreamResponse(service.stream(body, prepared))
    return await service.complete(body, prepared)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str, platform: PlatformDep, key: InferenceKey) -> dict[str, Any]:
    return (await asyncio.to_thread(platform.responses.get, key.tenant, response_id)).response


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, platform: PlatformDep, key: InferenceKey) -> dict[str, Any]:
    await asyncio.to_thread(platform.responses.delete, key.tenant, response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    platform: PlatformDep,
    key: InferenceKey,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
    after: Annotated[str | None, Query(max_length=64)] = None,
    before: Annotated[str | None, Query(max_length=64)] = None,
) -> dict[str, Any]:
    row = await asyncio.to_thread(platform.responses.get, key.tenant, response_id)
    items = list(row.input_items) if order == "asc" else list(reversed(row.input_items))
    ids = [item["id"] for item in items]
    if after is not None:
        items = items[ids.index(after) + 1 :] if after in ids else []
        ids = [item["id"] for item in items]
    if before is not None:
        items = items[: ids.index(before)] if before in ids else []
    return records.page(items[:limit], len(items) > limit)
