"""/v1/batches (scope `inference`): create, retrieve, cancel, list, isolated per tenant."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from llmos.api.context import limited
from llmos.api.deps import PlatformDep
from llmos.api.openai.chat.stored import json_object
from llmos.kernel.batches import Batch, BatchStore
from llmos.platform import Platform
from llmos.security import ApiKeyInfo

router = APIRouter(prefix="/v1/batches", tags=["batches"])
BatchKey = Annotated[ApiKeyInfo, Depends(limited("inference"))]
_FIELDS = {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}


def _store(platform: Platform) -> BatchStore:
    return BatchStore(platform.db, platform.files)


def _public(store: BatchStore, batches: list[Batch]) -> list[dict[str, Any]]:
    counts = store.counts([b.id for b in batches])
    return [b.public(*counts[b.id]) for b in batches]


@router.post("")
async def create_batch(request: Request, platform: PlatformDep, key: BatchKey) -> dict[str, Any]:
    """Check the input file against the endpoint and limits, then queue the batch (`validating`)."""
    body = await json_object(request, _FIELDS)  # tenant, owner, paths... are never taken from a request
    store = _store(platform)
    batch = await asyncio.to_thread(store.create, tenant=key.tenant, key_id=key.id, body=body)
    platform.audit.record(
        "batch.create",
        tenant=key.tenant,
        key_id=key.id,
        target=batch.id,
        client=request.client.host if request.client else None,
        detail={"endpoint": batch.endpoint, "lines": batch.total},
    )
    return batch.public(0, 0)


@router.get("")
async def list_batches(
    platform: PlatformDep,
    key: BatchKey,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    store = _store(platform)

    def page() -> tuple[list[dict[str, Any]], bool]:
        batches, more = store.page(key.tenant, after=after, limit=limit)
        return _public(store, batches), more

    data, has_more = await asyncio.to_thread(page)
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.get("/{batch_id}")
async def retrieve_batch(batch_id: str, platform: PlatformDep, key: BatchKey) -> dict[str, Any]:
    store = _store(platform)
    batch = await asyncio.to_thread(store.get, key.tenant, batch_id)
    return (await asyncio.to_thread(_public, store, [batch]))[0]


@router.post("/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request, platform: PlatformDep, key: BatchKey) -> dict[str, Any]:
    """Stop sending the batch's lines (`cancelling`); what was answered is written to its files
    and it becomes `cancelled`."""
    store = _store(platform)
    batch = await asyncio.to_thread(store.cancel, key.tenant, batch_id)
    platform.audit.record(
        "batch.cancel",
        tenant=key.tenant,
        key_id=key.id,
        target=batch.id,
        client=request.client.host if request.client else None,
    )
    return (await asyncio.to_thread(_public, store, [batch]))[0]
