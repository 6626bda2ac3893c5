from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from llmos.api.deps import EngineDep, InferenceKey, PlatformDep
from llmos.api.model_management.router import ModelsKey, changeable
from llmos.api.openai.models.schemas import ModelDeleted, ModelList, ModelObject
from llmos.export import model_exports
from llmos.platform import Platform
from llmos.registry import ModelRecord
from llmos.registry.records import SHARED_OWNER
from llmos.security import ApiKeyInfo

router = APIRouter(tags=["models"])


def _visible_to(key: ApiKeyInfo) -> str | None:
    """The tenant whose models (besides shared base models) a key sees; None for admins: all."""
    return None if "admin" in key.scopes else key.tenant


def _aliases(platform: Platform, key: ApiKeyInfo) -> dict[str, list[str]]:
    """Model id -> the ``name@alias`` references naming it that ``key`` may see."""
    out: dict[str, list[str]] = {}
    for alias in platform.registry.aliases.list():
        if "admin" in key.scopes or alias.owner in (key.tenant, SHARED_OWNER):
            out.setdefault(alias.model_id, []).append(alias.ref)
    return out


def _newest_versions(records: list[ModelRecord]) -> list[ModelRecord]:
    newest: dict[str, ModelRecord] = {}
    for r in records:
        if r.status == "ready" and (r.name not in newest or r.version > newest[r.name].version):
            newest[r.name] = r
    return list(newest.values())


@router.get("/v1/models", response_model=ModelList)
async def list_models(
    platform: PlatformDep,
    key: InferenceKey,
    versions: Annotated[bool, Query(description="Every ready version, not only the newest of each name.")] = False,
) -> Any:
    records = await asyncio.to_thread(platform.registry.list, tenant=_visible_to(key))
    aliases = await asyncio.to_thread(_aliases, platform, key)
    names = {r.id: r.name for r in records}
    admin = "admin" in key.scopes
    shown = [r for r in records if r.status == "ready"] if versions else _newest_versions(records)
    data = [
        ModelObject.from_record(
            r, parent_name=names.get(r.parent_id or ""), server_paths=admin, aliases=aliases.get(r.id)
        )
        for r in shown
    ]
    return ModelList(data=data).model_dump()


@router.get("/v1/models/{model:path}", response_model=ModelObject)
async def retrieve_model(model: str, platform: PlatformDep, key: InferenceKey) -> Any:
    record = await asyncio.to_thread(platform.registry.get, model, tenant=_visible_to(key))
    parent = await asyncio.to_thread(platform.registry.get, record.parent_id) if record.parent_id else None
    aliases = await asyncio.to_thread(_aliases, platform, key)
    # Exports are files: shown to keys that may read files or make exports, not to inference-only keys.
    exports = (
        await asyncio.to_thread(model_exports, platform.files, key.tenant, record.id)
        if key.allows("files") or key.allows("models")
        else None
    )
    return ModelObject.from_record(
        record,
        parent_name=parent.name if parent else None,
        detail=True,
        server_paths="admin" in key.scopes,
        aliases=aliases.get(record.id),
        exports=exports,
    ).model_dump()


@router.delete("/v1/models/{model:path}", response_model=ModelDeleted)
async def delete_model(model: str, platform: PlatformDep, engine: EngineDep, request: Request, key: ModelsKey) -> Any:
    """Delete a version (a tenant: its own models only) and the artifacts no other model uses."""
    record = await changeable(platform, model, key)
    await engine.unload(record.id)
    # By id: a concurrent delete of the same reference must not go on to the next older version.
    await asyncio.to_thread(platform.registry.delete, record.id)
    platform.audit.record(
        "model.delete",
        tenant=key.tenant,
        key_id=key.id,
        target=f"{record.name}@{record.version}",
        client=request.client.host if request.client else None,
    )
    return ModelDeleted(id=model, deleted=True).model_dump()
