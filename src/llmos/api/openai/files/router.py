"""/v1/files: upload, list, retrieve, content, delete (scope `files`), isolated per tenant."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Annotated, Any, BinaryIO, Literal

from fastapi import APIRouter, Depends, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse

from llmos.api.context import limited
from llmos.api.deps import PlatformDep
from llmos.registry.store import CHUNK
from llmos.security import ApiKeyInfo

router = APIRouter(tags=["files"])
FilesKey = Annotated[ApiKeyInfo, Depends(limited("files"))]  # its limits apply as to inference


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    while chunk := stream.read(CHUNK):
        yield chunk


@router.post("/v1/files")
async def upload_file(
    request: Request,
    platform: PlatformDep,
    key: FilesKey,
    file: Annotated[UploadFile, File(description="The file; JSONL, CSV/TSV or CoNLL for fine-tuning.")],
    purpose: Annotated[str, Form(description="`fine-tune`, `batch`, `pretrain` (text), `assistants`, `user_data`.")],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Any:
    """Store a file content-addressed and validate it for its purpose (see `status`, `status_details`)."""
    record, created = await asyncio.to_thread(
        platform.files.create,
        tenant=key.tenant,
        purpose=purpose,
        filename=file.filename,
        chunks=_chunks(file.file),
        max_bytes=platform.settings.max_upload_bytes,
        idempotency_key=idempotency_key,
    )
    if created:
        platform.audit.record(
            "file.upload",
            tenant=key.tenant,
            key_id=key.id,
            target=record.id,
            client=request.client.host if request.client else None,
            detail={"purpose": record.purpose, "bytes": record.bytes, "status": record.status},
        )
    return JSONResponse(record.public(), status_code=200)


@router.get("/v1/files")
async def list_files(
    platform: PlatformDep,
    key: FilesKey,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    after: Annotated[str | None, Query(max_length=64)] = None,
    order: Annotated[Literal["asc", "desc"], Query()] = "desc",
) -> dict[str, Any]:
    records, has_more = await asyncio.to_thread(
        platform.files.list, key.tenant, purpose=purpose, limit=limit, after=after, order=order
    )
    data = [r.public() for r in records]
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, platform: PlatformDep, key: FilesKey) -> dict[str, Any]:
    return (await asyncio.to_thread(platform.files.get, key.tenant, file_id)).public()


@router.get("/v1/files/{file_id}/content", response_class=FileResponse)
async def file_content(file_id: str, platform: PlatformDep, key: FilesKey) -> FileResponse:
    record = await asyncio.to_thread(platform.files.get, key.tenant, file_id)
    path = await asyncio.to_thread(platform.files.content_path, key.tenant, file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=record.filename)


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request, platform: PlatformDep, key: FilesKey) -> dict[str, Any]:
    record = await asyncio.to_thread(platform.files.delete, key.tenant, file_id)
    await asyncio.to_thread(platform.vector_stores.forget_file, key.tenant, record.id)  # its chunks go too
    platform.audit.record(
        "file.delete",
        tenant=key.tenant,
        key_id=key.id,
        target=record.id,
        client=request.client.host if request.client else None,
    )
    return {"id": record.id, "object": "file", "deleted": True}
