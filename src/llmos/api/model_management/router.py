"""Model management over HTTP (a key with the ``models`` scope, or admin): pulls as operations
that can be followed and cancelled, description and tags, load (pin) and unload, what is resident.

Tenant-aware like the rest of the API: a tenant's key pulls models its tenant owns, sees and
changes only those (and sees the shared ones); shared models are changed by admins only.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from llmos.api.deps import EngineDep, PlatformDep, require
from llmos.api.model_management.schemas import ModelLoad, ModelUpdate, PullCreate
from llmos.api.openai.models.schemas import ModelObject
from llmos.api.sse import EventStreamResponse, sse_event
from llmos.errors import InvalidRequestError, PermissionDeniedError
from llmos.platform import Platform
from llmos.registry import ModelRecord
from llmos.registry.operations import Operation
from llmos.registry.pulls import PullOperations
from llmos.registry.records import SHARED_OWNER, Lineage
from llmos.security import ApiKeyInfo

router = APIRouter(tags=["model management"])
ModelsKey = Annotated[ApiKeyInfo, Depends(require("models"))]
FOLLOW_POLL_S = 0.25  # how often a followed pull is looked at for changes
TENANT_SOURCES = ("pypi:", "hf:")  # file: reads the server's disk: admins only


def get_pulls(request: Request) -> PullOperations:
    pulls: PullOperations = request.app.state.pulls
    return pulls


PullsDep = Annotated[PullOperations, Depends(get_pulls)]


def _tenant_of(key: ApiKeyInfo) -> str | None:
    """Whose models and pulls a key sees besides the shared ones; None for admins: all."""
    return None if "admin" in key.scopes else key.tenant


def _audit(platform: Platform, request: Request, key: ApiKeyInfo, action: str, target: str, **detail: Any) -> None:
    client = request.client.host if request.client else None
    platform.audit.record(action, tenant=key.tenant, key_id=key.id, target=target, client=client, detail=detail)


async def changeable(platform: Platform, ref: str, key: ApiKeyInfo) -> ModelRecord:
    """The model ``ref`` if ``key`` may change it: its tenant's own, or any for an admin."""
    record = await asyncio.to_thread(platform.registry.get, ref, tenant=_tenant_of(key))
    if "admin" not in key.scopes and record.owner != key.tenant:
        raise PermissionDeniedError(f"{record.name} is a shared model; only an admin may change it", param="model")
    return record


@router.post("/v1/model_pulls", status_code=202)
async def start_pull(
    body: PullCreate, platform: PlatformDep, pulls: PullsDep, request: Request, key: ModelsKey
) -> dict[str, Any]:
    """Start pulling a model; follow it at ``GET /v1/model_pulls/{id}`` or its ``/events``."""
    admin = "admin" in key.scopes
    if not admin and ":" in body.model and not body.model.startswith(TENANT_SOURCES):
        raise InvalidRequestError(
            f"a tenant pulls catalog names or {', '.join(TENANT_SOURCES)} sources", param="model", code="source_refused"
        )
    owner = SHARED_OWNER if admin else key.tenant
    op = pulls.start(
        body.model,
        tenant=key.tenant,
        name=body.name,
        lineage=Lineage(owner=owner),
        description=body.description,
        tags=tuple(body.tags) if body.tags is not None else None,
    )
    _audit(platform, request, key, "model.pull", body.model, pull=op.id, owner=owner)
    return op.public()


@router.get("/v1/model_pulls")
async def list_pulls(pulls: PullsDep, key: ModelsKey) -> dict[str, Any]:
    return {"object": "list", "data": [op.public() for op in pulls.list(tenant=_tenant_of(key))]}


@router.get("/v1/model_pulls/{pull_id}")
async def get_pull(pull_id: str, pulls: PullsDep, key: ModelsKey) -> dict[str, Any]:
    return pulls.get(pull_id, tenant=_tenant_of(key)).public()


@router.get("/v1/model_pulls/{pull_id}/events")
async def follow_pull(pull_id: str, pulls: PullsDep, key: ModelsKey) -> EventStreamResponse:
    """Server-sent events: the operation's state at each change, until it finishes."""
    return follow_operation(pulls.get(pull_id, tenant=_tenant_of(key)))


def follow_operation(op: Operation) -> EventStreamResponse:
    """Server-sent events of an operation (a pull, an export): its state at each change, until it finishes."""

    async def events() -> AsyncIterator[str]:
        seen = -1
        while True:
            revision, finished = op.revision, op.finished
            if revision != seen:
                seen = revision
                yield sse_event(op.public())
            if finished:
                return
            await asyncio.sleep(FOLLOW_POLL_S)

    return EventStreamResponse(events())


@router.post("/v1/model_pulls/{pull_id}/cancel")
async def cancel_pull(
    pull_id: str, platform: PlatformDep, pulls: PullsDep, request: Request, key: ModelsKey
) -> dict[str, Any]:
    """Ask a running pull to stop; it ends ``cancelled`` at its next progress report, leaving nothing."""
    op = pulls.cancel(pull_id, tenant=_tenant_of(key))
    _audit(platform, request, key, "model.pull_cancel", op.ref, pull=op.id)
    return op.public()


@router.patch("/v1/models/{model:path}")
async def update_model(
    model: str, body: ModelUpdate, platform: PlatformDep, request: Request, key: ModelsKey
) -> dict[str, Any]:
    """Set a version's description and/or tags."""
    record = await changeable(platform, model, key)
    tags = tuple(body.tags) if body.tags is not None else None
    record = await asyncio.to_thread(platform.registry.describe, record.id, description=body.description, tags=tags)
    _audit(platform, request, key, "model.update", f"{record.name}@{record.version}", **body.model_dump())
    return ModelObject.from_record(record, detail=True, server_paths="admin" in key.scopes).model_dump()


@router.post("/v1/models/{model:path}/load")
async def load_model(
    model: str,
    platform: PlatformDep,
    engine: EngineDep,
    request: Request,
    key: ModelsKey,
    body: ModelLoad | None = None,
) -> dict[str, Any]:
    """Load a model's runner now (an adapter loads its base); ``pin`` keeps it until unloaded."""
    body = body or ModelLoad()
    record = await changeable(platform, model, key)
    await engine.load(await engine.resolve(record.id), pin=body.pin)
    _audit(platform, request, key, "model.load", f"{record.name}@{record.version}", pin=body.pin)
    return {"id": record.name, "object": "model", "loaded": True, "pinned": body.pin}


@router.post("/v1/models/{model:path}/unload")
async def unload_model(
    model: str, platform: PlatformDep, engine: EngineDep, request: Request, key: ModelsKey
) -> dict[str, Any]:
    """Unpin a model and free its memory unless requests are using it (then it goes when idle)."""
    record = await changeable(platform, model, key)
    await engine.unload(record.id)
    _audit(platform, request, key, "model.unload", f"{record.name}@{record.version}")
    return {"id": record.name, "object": "model", "loaded": False}


@router.get("/v1/resident_models")
async def resident_models(platform: PlatformDep, engine: EngineDep, key: ModelsKey) -> dict[str, Any]:
    """What is in memory: each runner's model, bytes, pinning and adapters (a tenant: its visible ones)."""
    stats = engine.stats()
    records = await asyncio.to_thread(platform.registry.list, tenant=_tenant_of(key))
    visible_ids, visible_names = {r.id for r in records}, {r.name for r in records}
    data = []
    for runner_key, entry in stats.get("models", {}).items():
        model_id = runner_key.split("+", 1)[0]
        if model_id in visible_ids:
            adapters = [a for a in entry.get("adapters", []) if a in visible_names]
            data.append({**entry, "object": "resident_model", "id": model_id, "adapters": adapters})
    return {
        "object": "list",
        "data": data,
        "memory_budget_bytes": stats.get("memory_budget_bytes"),
        "resident_bytes": stats.get("resident_bytes"),
    }
