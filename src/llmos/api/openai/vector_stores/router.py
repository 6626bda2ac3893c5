"""/v1/vector_stores with its files, file batches and search (scope `files`), per tenant."""

from __future__ import annotations

import asyncio
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from llmos.api.context import limited
from llmos.api.deps import PlatformDep
from llmos.api.openai.vector_stores import schemas
from llmos.api.openai.vector_stores.serving import Retrieval
from llmos.errors import InvalidRequestError
from llmos.retrieval import records
from llmos.retrieval.chunking import StaticChunking
from llmos.retrieval.filters import check_attributes
from llmos.security import ApiKeyInfo

router = APIRouter(tags=["vector_stores"])
StoresKey = Annotated[ApiKeyInfo, Depends(limited("files"))]
Limit = Annotated[int, Query(ge=1, le=100)]
Order = Annotated[Literal["asc", "desc"], Query()]
Cursor = Annotated[str | None, Query(max_length=64)]
FileState = Annotated[Literal["in_progress", "completed", "failed", "cancelled"] | None, Query()]


@router.post("/v1/vector_stores")
async def create_vector_store(
    body: schemas.CreateVectorStore, request: Request, platform: PlatformDep, key: StoresKey
) -> dict[str, Any]:
    retrieval = Retrieval(request, key)
    model = body.embedding_model or platform.settings.vector_store_embedding_model
    await retrieval.check_embedding_model(model)
    chunking = body.chunking_strategy
    if chunking is not None:
        StaticChunking.parse(chunking)  # refused before anything is created
    for file_id in body.file_ids or []:
        await asyncio.to_thread(platform.files.get, key.tenant, file_id)
    store = await asyncio.to_thread(
        platform.vector_stores.create,
        key.tenant,
        name=body.name or "",
        description=body.description,
        embedding_model=model,
        metadata=body.metadata,
        expires_after_days=body.expires_after.days if body.expires_after else None,
    )
    if body.file_ids:
        await retrieval.attach(store, [(file_id, None, chunking) for file_id in body.file_ids])
    return await asyncio.to_thread(platform.vector_stores.public, key.tenant, store.id)


@router.get("/v1/vector_stores")
async def list_vector_stores(
    platform: PlatformDep,
    key: StoresKey,
    limit: Limit = 20,
    order: Order = "desc",
    after: Cursor = None,
    before: Cursor = None,
) -> dict[str, Any]:
    stores = await asyncio.to_thread(platform.vector_stores.listing, key.tenant)
    return records.paginate(stores, limit=limit, order=order, after=after, before=before)


@router.get("/v1/vector_stores/{vector_store_id}")
async def retrieve_vector_store(vector_store_id: str, platform: PlatformDep, key: StoresKey) -> dict[str, Any]:
    return await asyncio.to_thread(platform.vector_stores.public, key.tenant, vector_store_id)


@router.post("/v1/vector_stores/{vector_store_id}")
async def update_vector_store(
    vector_store_id: str, body: schemas.UpdateVectorStore, platform: PlatformDep, key: StoresKey
) -> dict[str, Any]:
    changes: dict[str, Any] = {}
    if "name" in body.model_fields_set:
        changes["name"] = body.name or ""
    if "metadata" in body.model_fields_set:
        changes["store_metadata"] = body.metadata
    if "expires_after" in body.model_fields_set:
        changes["expires_after_days"] = body.expires_after.days if body.expires_after else None
    await asyncio.to_thread(platform.vector_stores.update, key.tenant, vector_store_id, changes)
    return await asyncio.to_thread(platform.vector_stores.public, key.tenant, vector_store_id)


@router.delete("/v1/vector_stores/{vector_store_id}")
async def delete_vector_store(vector_store_id: str, platform: PlatformDep, key: StoresKey) -> dict[str, Any]:
    await asyncio.to_thread(platform.vector_stores.delete, key.tenant, vector_store_id)
    return {"id": vector_store_id, "object": "vector_store.deleted", "deleted": True}


@router.post("/v1/vector_stores/{vector_store_id}/files")
async def attach_file(
    vector_store_id: str, body: schemas.AttachFile, request: Request, platform: PlatformDep, key: StoresKey
) -> dict[str, Any]:
    store = await asyncio.to_thread(platform.vector_stores.usable, key.tenant, vector_store_id)
    await Retrieval(request, key).attach(store, [(body.file_id, body.attributes, body.chunking_strategy)])
    row = await asyncio.to_thread(platform.vector_stores.file, key.tenant, vector_store_id, body.file_id)
    return records.file_object(row)


@router.get("/v1/vector_stores/{vector_store_id}/files")
async def list_store_files(
    vector_store_id: str,
    platform: PlatformDep,
    key: StoresKey,
    limit: Limit = 20,
    order: Order = "desc",
    after: Cursor = None,
    before: Cursor = None,
    filter: FileState = None,
) -> dict[str, Any]:
    rows = await asyncio.to_thread(platform.vector_stores.files, key.tenant, vector_store_id)
    data = [records.file_object(r) for r in rows if filter is None or r.status == filter]
    return records.paginate(data, limit=limit, order=order, after=after, before=before)


@router.get("/v1/vector_stores/{vector_store_id}/files/{file_id}")
async def retrieve_store_file(
    vector_store_id: str, file_id: str, platform: PlatformDep, key: StoresKey
) -> dict[str, Any]:
    return records.file_object(
        await asyncio.to_thread(platform.vector_stores.file, key.tenant, vector_store_id, file_id)
    )


@router.post("/v1/vector_stores/{vector_store_id}/files/{file_id}")
async def update_store_file(
    vector_store_id: str, file_id: str, body: schemas.UpdateFile, platform: PlatformDep, key: StoresKey
) -> dict[str, Any]:
    attributes = check_attributes(body.attributes)
    await asyncio.to_thread(platform.vector_stores.set_attributes, key.tenant, vector_store_id, file_id, attributes)
    return records.file_object(
        await asyncio.to_thread(platform.vector_stores.file, key.tenant, vector_store_id, file_id)
    )


@router.get("/v1/vector_stores/{vector_store_id}/files/{file_id}/content")
async def store_file_content(
    vector_store_id: str, file_id: str, platform: PlatformDep, key: StoresKey
) -> dict[str, Any]:
    """The file's parsed chunks, in order."""
    await asyncio.to_thread(platform.vector_stores.file, key.tenant, vector_store_id, file_id)
    texts = await asyncio.to_thread(platform.vector_stores.file_chunks, vector_store_id, file_id)
    return {
        "object": "vector_store.file_content.page",
        "data": [{"type": "text", "text": t} for t in texts],
        "has_more": False,
        "next_page": None,
    }


@router.delete("/v1/vector_stores/{vector_store_id}/files/{file_id}")
async def detach_file(vector_store_id: str, file_id: str, platform: PlatformDep, key: StoresKey) -> dict[str, Any]:
    await asyncio.to_thread(platform.vector_stores.detach, key.tenant, vector_store_id, file_id)
    return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}


@router.post("/v1/vector_stores/{vector_store_id}/file_batches")
async def create_file_batch(
    vector_store_id: str, body: schemas.CreateFileBatch, request: Request, platform: PlatformDep, key: StoresKey
) -> dict[str, Any]:
    if (body.file_ids is None) == (body.files is None):
        raise InvalidRequestError("give exactly one of file_ids and files", param="file_ids")
    store = await asyncio.to_thread(platform.vector_stores.usable, key.tenant, vector_store_id)
    if body.files is not None:
        specs = [(f.file_id, f.attributes, f.chunking_strategy) for f in body.files]
    else:
        specs = [(file_id, body.attributes, body.chunking_strategy) for file_id in body.file_ids or []]
    batch_id = f"vsfb_{uuid.uuid4().hex[:24]}"
    await Retrieval(request, key).attach(store, specs, batch_id=batch_id)
    return await asyncio.to_thread(platform.vector_stores.batch, key.tenant, vector_store_id, batch_id)


@router.get("/v1/vector_stores/{vector_store_id}/file_batches/{batch_id}")
async def retrieve_file_batch(
    vector_store_id: str, batch_id: str, platform: PlatformDep, key: StoresKey
) -> dict[str, Any]:
    return await asyncio.to_thread(platform.vector_stores.batch, key.tenant, vector_store_id, batch_id)


@router.post("/v1/vector_stores/{vector_store_id}/file_batches/{batch_id}/cancel")
async def cancel_file_batch(
    vector_store_id: str, batch_id: str, platform: PlatformDep, key: StoresKey
) -> dict[str, Any]:
    await asyncio.to_thread(platform.vector_stores.cancel_batch, key.tenant, vector_store_id, batch_id)
    return await asyncio.to_thread(platform.vector_stores.batch, key.tenant, vector_store_id, batch_id)


@router.get("/v1/vector_stores/{vector_store_id}/file_batches/{batch_id}/files")
async def list_batch_files(
    vector_store_id: str,
    batch_id: str,
    platform: PlatformDep,
    key: StoresKey,
    limit: Limit = 20,
    order: Order = "desc",
    after: Cursor = None,
    before: Cursor = None,
    filter: FileState = None,
) -> dict[str, Any]:
    await asyncio.to_thread(platform.vector_stores.batch, key.tenant, vector_store_id, batch_id)
    rows = await asyncio.to_thread(platform.vector_stores.files, key.tenant, vector_store_id, batch_id)
    data = [records.file_object(r) for r in rows if filter is None or r.status == filter]
    return records.paginate(data, limit=limit, order=order, after=after, before=before)


@router.post("/v1/vector_stores/{vector_store_id}/search")
async def search_vector_store(
    vector_store_id: str, body: schemas.SearchRequest, request: Request, key: StoresKey
) -> dict[str, Any]:
    if body.rewrite_query:
        raise InvalidRequestError("rewrite_query is not supported", param="rewrite_query")
    hits = await Retrieval(request, key).search_ranked(
        [vector_store_id],
        body.queries(),
        max_results=body.max_num_results,
        filters=body.filters,
        ranking=body.ranking_options,
    )
    return {
        "object": "vector_store.search_results.page",
        "search_query": body.queries(),
        "data": [hit.public() for hit in hits],
        "has_more": False,
        "next_page": None,
    }
