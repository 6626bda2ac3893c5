"""Stored chat completions (scope `inference`), as OpenAI's: list with filters, retrieve, update
metadata, delete, and the messages of one; a tenant sees only its own."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from llmos.api.context import limited
from llmos.api.deps import PlatformDep
from llmos.errors import InvalidRequestError
from llmos.registry.metadata import check_metadata
from llmos.security import ApiKeyInfo

router = APIRouter(prefix="/v1/chat/completions", tags=["chat"])
StoredKey = Annotated[ApiKeyInfo, Depends(limited("inference"))]


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's cursor page: the ``openai`` package asks for the next one ``after`` the last id."""
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def metadata_filter(request: Request) -> dict[str, str] | None:
    """``metadata[key]=value`` query parameters (how the ``openai`` package sends a dict)."""
    pairs: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name.startswith("metadata[") and name.endswith("]"):
            pairs[name[len("metadata[") : -1]] = value
        elif name.startswith("metadata"):
            raise InvalidRequestError("filter metadata as metadata[key]=value", param="metadata")
    return check_metadata(pairs) if pairs else None


async def json_object(request: Request, fields: set[str]) -> dict[str, Any]:
    """The request's JSON object, refusing any field not in ``fields`` (400 naming it)."""
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequestError("We could not parse the JSON body of your request.") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise InvalidRequestError(f"unknown field '{unknown[0]}'", param=unknown[0])
    return body


@router.get("")
async def list_stored(
    request: Request,
    platform: PlatformDep,
    key: StoredKey,
    model: Annotated[str | None, Query(max_length=512)] = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query()] = "asc",
) -> dict[str, Any]:
    metadata = metadata_filter(request)
    records, has_more = await asyncio.to_thread(
        platform.completions.list, key.tenant, model=model, metadata=metadata, after=after, limit=limit, order=order
    )
    return page([r.public() for r in records], has_more)


@router.get("/{completion_id}")
async def retrieve_stored(completion_id: str, platform: PlatformDep, key: StoredKey) -> dict[str, Any]:
    return (await asyncio.to_thread(platform.completions.get, key.tenant, completion_id)).public()


@router.post("/{completion_id}")
async def update_stored(completion_id: str, request: Request, platform: PlatformDep, key: StoredKey) -> dict[str, Any]:
    """Replace the metadata (the one field OpenAI lets a stored completion change)."""
    body = await json_object(request, {"metadata"})
    if "metadata" not in body:
        raise InvalidRequestError("metadata is required", param="metadata")
    metadata = check_metadata(body["metadata"])
    record = await asyncio.to_thread(platform.completions.update_metadata, key.tenant, completion_id, metadata)
    return record.public()


@router.delete("/{completion_id}")
async def delete_stored(completion_id: str, request: Request, platform: PlatformDep, key: StoredKey) -> dict[str, Any]:
    await asyncio.to_thread(platform.completions.delete, key.tenant, completion_id)
    platform.audit.record(
        "completion.delete",
        tenant=key.tenant,
        key_id=key.id,
        target=completion_id,
        client=request.client.host if request.client else None,
    )
    return {"id": completion_id, "object": "chat.completion.deleted", "deleted": True}


@router.get("/{completion_id}/messages")
async def list_messages(
    completion_id: str,
    platform: PlatformDep,
    key: StoredKey,
    after: Annotated[str | None, Query(max_length=80)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Annotated[Literal["asc", "desc"], Query()] = "asc",
) -> dict[str, Any]:
    record = await asyncio.to_thread(platform.completions.get, key.tenant, completion_id)
    messages = record.public_messages()
    if order == "desc":
        messages.reverse()
    if after is not None:
        ids = [m["id"] for m in messages]
        messages = messages[ids.index(after) + 1 :] if after in ids else []
    return page(messages[:limit], len(messages) > limit)
