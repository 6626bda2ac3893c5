"""Model aliases (scope `models`): set or move ``name@alias`` to a version, list, delete; every
change audited. Resolution is the registry's (``ModelRegistry._resolve``), so an alias works
wherever a model is named."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from llmos.api.deps import PlatformDep
from llmos.api.model_management.router import ModelsKey
from llmos.api.openai.chat.stored import json_object
from llmos.errors import InvalidRequestError, ModelNotFoundError
from llmos.platform import Platform
from llmos.registry.aliases import Alias
from llmos.registry.records import SHARED_OWNER
from llmos.security import ApiKeyInfo

router = APIRouter(prefix="/v1/model_aliases", tags=["models"])


def _admin(key: ApiKeyInfo) -> bool:
    return "admin" in key.scopes


def _public(platform: Platform, alias: Alias) -> dict[str, Any]:
    target = platform.registry.get(alias.model_id)
    return {
        "id": alias.ref,
        "object": "model.alias",
        "model": alias.name,
        "alias": alias.alias,
        "target": {"id": target.id, "root": f"{target.name}@{target.version}", "task": target.task},
        "owned_by": alias.owner,
        "updated_at": int(alias.updated_at.timestamp()),
    }


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{name} is required and must be a string", param=name)
    return value


@router.get("")
async def list_aliases(
    platform: PlatformDep, key: ModelsKey, model: Annotated[str | None, Query(max_length=256)] = None
) -> dict[str, Any]:
    """The aliases the caller may see (its tenant's and shared lines'; an admin: all)."""
    found = await asyncio.to_thread(platform.registry.aliases.list, name=model)
    shown = [a for a in found if _admin(key) or a.owner in (key.tenant, SHARED_OWNER)]
    data = await asyncio.to_thread(lambda: [_public(platform, a) for a in shown])
    return {"object": "list", "data": data}


@router.post("")
async def set_alias(request: Request, platform: PlatformDep, key: ModelsKey) -> dict[str, Any]:
    """``{"model": name, "alias": "production", "target": a model reference}``: create or move."""
    body = await json_object(request, {"model", "alias", "target"})
    name, alias, ref = _text(body, "model"), _text(body, "alias"), _text(body, "target")
    try:
        target = await asyncio.to_thread(platform.registry.get, ref, tenant=None if _admin(key) else key.tenant)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(exc.message, param="target") from exc
    moved, before = await asyncio.to_thread(
        platform.registry.aliases.set, name, alias, target, tenant=key.tenant, admin=_admin(key)
    )
    platform.audit.record(
        "model.alias.set",
        tenant=key.tenant,
        key_id=key.id,
        target=moved.ref,
        client=request.client.host if request.client else None,
        detail={"from": before, "to": target.id},
    )
    return await asyncio.to_thread(_public, platform, moved)


@router.delete("/{ref}")
async def delete_alias(ref: str, request: Request, platform: PlatformDep, key: ModelsKey) -> dict[str, Any]:
    """Delete ``name@alias`` (the version it named stays)."""
    name, _, alias = ref.partition("@")
    if not alias:
        raise InvalidRequestError("name the alias as name@alias", param="alias")
    gone = await asyncio.to_thread(platform.registry.aliases.delete, name, alias, tenant=key.tenant, admin=_admin(key))
    platform.audit.record(
        "model.alias.delete",
        tenant=key.tenant,
        key_id=key.id,
        target=gone.ref,
        client=request.client.host if request.client else None,
        detail={"from": gone.model_id},
    )
    return {"id": gone.ref, "object": "model.alias", "deleted": True}
