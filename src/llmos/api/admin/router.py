"""Native administration under /v1/admin (admin scope): tenants, keys, audit, engine, settings."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from llmos.api.admin.schemas import KeyCreate, TenantCreate, TenantUpdate
from llmos.api.deps import AdminKey, EngineDep, PlatformDep, SettingsDep
from llmos.security import ApiKeyInfo
from llmos.security.limits import Limits

router = APIRouter(prefix="/v1/admin", tags=["admin"])


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def _audit(platform: Any, request: Request, key: ApiKeyInfo, action: str, target: str, **detail: Any) -> None:
    platform.audit.record(
        action, tenant=key.tenant, key_id=key.id, target=target, client=_client(request), detail=detail
    )


@router.get("/engine")
async def engine_stats(engine: EngineDep, _key: AdminKey) -> dict[str, Any]:
    """Resident models, pending requests and token counters of the inference engine."""
    return engine.stats()


@router.get("/settings")
async def settings_view(settings: SettingsDep, _key: AdminKey) -> dict[str, Any]:
    """The effective settings, secrets masked."""
    return settings.as_public_dict()


@router.post("/tenants", status_code=201)
async def create_tenant(body: TenantCreate, platform: PlatformDep, request: Request, key: AdminKey) -> dict[str, Any]:
    limits = Limits.parse(body.limits)
    tenant = await asyncio.to_thread(platform.tenants.create, body.id, name=body.name, limits=limits)
    _audit(platform, request, key, "tenant.create", tenant.id, limits=limits.as_dict())
    return tenant.public()


@router.get("/tenants")
async def list_tenants(platform: PlatformDep, _key: AdminKey) -> dict[str, Any]:
    tenants = await asyncio.to_thread(platform.tenants.list)
    return {"object": "list", "data": [t.public() for t in tenants]}


@router.get("/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, platform: PlatformDep, _key: AdminKey) -> dict[str, Any]:
    return (await asyncio.to_thread(platform.tenants.get, tenant_id)).public()


@router.patch("/tenants/{tenant_id}")
async def update_tenant(
    tenant_id: str, body: TenantUpdate, platform: PlatformDep, request: Request, key: AdminKey
) -> dict[str, Any]:
    limits = Limits.parse(body.limits) if body.limits is not None else None
    tenant = await asyncio.to_thread(
        platform.tenants.update, tenant_id, name=body.name, limits=limits, disabled=body.disabled
    )
    _audit(platform, request, key, "tenant.update", tenant_id, **body.model_dump(exclude_none=True))
    return tenant.public()


@router.post("/keys", status_code=201)
async def create_key(body: KeyCreate, platform: PlatformDep, request: Request, key: AdminKey) -> dict[str, Any]:
    expires = datetime.fromtimestamp(body.expires_at, UTC) if body.expires_at else None
    info, secret = await asyncio.to_thread(
        platform.keys.create,
        body.name,
        tenant=body.tenant,
        scopes=tuple(body.scopes),
        expires_at=expires,
        limits=Limits.parse(body.limits),
    )
    _audit(platform, request, key, "key.create", info.id, tenant=info.tenant, scopes=list(info.scopes))
    return {**info.public(), "key": secret}


@router.get("/keys")
async def list_keys(
    platform: PlatformDep, _key: AdminKey, tenant: Annotated[str | None, Query(max_length=63)] = None
) -> dict[str, Any]:
    keys = await asyncio.to_thread(platform.keys.list)
    return {"object": "list", "data": [k.public() for k in keys if tenant is None or k.tenant == tenant]}


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, platform: PlatformDep, request: Request, key: AdminKey) -> dict[str, Any]:
    info = await asyncio.to_thread(platform.keys.revoke, key_id)
    _audit(platform, request, key, "key.revoke", key_id, tenant=info.tenant)
    return info.public()


@router.get("/audit")
async def audit_log(
    platform: PlatformDep,
    _key: AdminKey,
    tenant: Annotated[str | None, Query(max_length=63)] = None,
    action: Annotated[str | None, Query(max_length=64)] = None,
    after: Annotated[int | None, Query(ge=1, le=2**62, description="Return events older than this id.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Security-relevant events, newest first (page with ``after``)."""
    events = await asyncio.to_thread(platform.audit.query, tenant=tenant, action=action, after=after, limit=limit)
    data = [{**e.__dict__, "at": int(e.at.timestamp()), "object": "audit_event"} for e in events]
    return {"object": "list", "data": data, "has_more": len(data) == limit}
