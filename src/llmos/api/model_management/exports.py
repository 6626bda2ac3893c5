"""Model exports over HTTP (a key with the ``models`` scope): a registered model written for
another runtime, verified, then offered as a file of the files API (``llmos.export``).

A tenant exports the models it sees (its own and the shared ones) into a file of its own; the
operation is followed like a pull, and the finished file is downloaded at
``GET /v1/files/{file_id}/content``.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from llmos.api.deps import PlatformDep
from llmos.api.model_management.router import ModelsKey, _audit, _tenant_of, follow_operation
from llmos.api.model_management.schemas import ExportCreate
from llmos.api.sse import EventStreamResponse
from llmos.export import FORMATS, ExportOperations

router = APIRouter(tags=["model management"])


def get_exports(request: Request) -> ExportOperations:
    exports: ExportOperations = request.app.state.exports
    return exports


ExportsDep = Annotated[ExportOperations, Depends(get_exports)]


@router.post("/v1/models/{model:path}/exports", status_code=202)
async def start_export(
    model: str, body: ExportCreate, platform: PlatformDep, exports: ExportsDep, request: Request, key: ModelsKey
) -> dict[str, Any]:
    """Export a model; follow it at ``GET /v1/model_exports/{id}`` or its ``/events``."""
    op = await asyncio.to_thread(exports.start, model, body.format, tenant=key.tenant, visible_to=_tenant_of(key))
    _audit(platform, request, key, "model.export", op.ref, export=op.id, format=op.format)
    return op.public()


@router.get("/v1/model_export_formats")
async def list_formats(key: ModelsKey) -> dict[str, Any]:
    data = [
        {"id": f.name, "object": "model.export_format", "tasks": sorted(f.tasks), "description": f.description}
        for f in FORMATS.values()
    ]
    return {"object": "list", "data": data}


@router.get("/v1/model_exports")
async def list_exports(
    exports: ExportsDep, key: ModelsKey, model: Annotated[str | None, Query(max_length=512)] = None
) -> dict[str, Any]:
    """This server's recent exports (``model``: those of one ``name@version``)."""
    ops = [op for op in exports.list(tenant=_tenant_of(key)) if model is None or op.ref == model]
    return {"object": "list", "data": [op.public() for op in ops]}


@router.get("/v1/model_exports/{export_id}")
async def get_export(export_id: str, exports: ExportsDep, key: ModelsKey) -> dict[str, Any]:
    return exports.get(export_id, tenant=_tenant_of(key)).public()


@router.get("/v1/model_exports/{export_id}/events")
async def follow_export(export_id: str, exports: ExportsDep, key: ModelsKey) -> EventStreamResponse:
    """Server-sent events: the export's state at each change, until it finishes."""
    return follow_operation(exports.get(export_id, tenant=_tenant_of(key)))


@router.post("/v1/model_exports/{export_id}/cancel")
async def cancel_export(
    export_id: str, platform: PlatformDep, exports: ExportsDep, request: Request, key: ModelsKey
) -> dict[str, Any]:
    """Ask a running export to stop; it ends ``cancelled`` at its next stage, storing nothing."""
    op = exports.cancel(export_id, tenant=_tenant_of(key))
    _audit(platform, request, key, "model.export_cancel", op.ref, export=op.id)
    return op.public()
