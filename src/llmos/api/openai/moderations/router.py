"""POST /v1/moderations (OpenAI's shape, scope `inference`) and each tenant's moderation policy
under /v1/admin/tenants/{tenant_id}/moderation (admin scope, audited)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from llmos.api.context import RequestContext, admitted
from llmos.api.deps import AdminKey, EngineDep, PlatformDep, SettingsDep
from llmos.api.openai.moderations.schemas import ModerationRequest, PolicyBody
from llmos.api.openai.moderations.serving import Moderator
from llmos.api.tasks.common import text_inputs
from llmos.errors import InvalidRequestError, NotFoundError
from llmos.registry.moderation import ModerationPolicies, check_policy

router = APIRouter(tags=["moderations"])
ModerationContext = Annotated[RequestContext, Depends(admitted("moderation"))]


@router.post("/v1/moderations")
async def create_moderation(
    body: ModerationRequest, engine: EngineDep, settings: SettingsDep, ctx: ModerationContext
) -> dict[str, Any]:
    """Each input's categories, scores and whether it is flagged, by a classification model."""
    texts = text_inputs(body.texts(), settings)
    moderator = await Moderator.of(engine, settings, ctx)
    moderation = await moderator.moderate(texts, body.model)
    ctx.finish(moderation.model, moderation.prompt_tokens, 0)
    return moderation.public()


@router.get("/v1/admin/tenants/{tenant_id}/moderation")
async def get_policy(tenant_id: str, platform: PlatformDep, _key: AdminKey) -> dict[str, Any]:
    await asyncio.to_thread(platform.tenants.get, tenant_id)
    policy = await asyncio.to_thread(ModerationPolicies(platform.db).get, tenant_id)
    if policy is None:
        raise NotFoundError(f"tenant {tenant_id!r} has no moderation policy", param="tenant_id")
    return policy.public(tenant_id)


@router.put("/v1/admin/tenants/{tenant_id}/moderation")
async def put_policy(
    tenant_id: str, body: PolicyBody, request: Request, platform: PlatformDep, settings: SettingsDep, key: AdminKey
) -> dict[str, Any]:
    """Replace the tenant's policy whole. Chat checks need a model to check with."""
    await asyncio.to_thread(platform.tenants.get, tenant_id)
    policy = check_policy(**body.model_dump())
    if (policy.check_input or policy.check_output) and not (policy.model or settings.moderation_model):
        raise InvalidRequestError(
            "check_input and check_output need a model: name one here or set moderation_model", param="model"
        )
    if policy.model is not None:  # a model the tenant may use, known now rather than at its first chat
        await asyncio.to_thread(platform.registry.get, policy.model, tenant=tenant_id)
    await asyncio.to_thread(ModerationPolicies(platform.db).put, tenant_id, policy)
    await asyncio.to_thread(
        platform.audit.record,
        "moderation.policy.put",
        tenant=key.tenant,
        key_id=key.id,
        target=tenant_id,
        client=request.client.host if request.client else None,
        detail={k: v for k, v in policy.as_dict().items() if k != "blocked_terms"},
    )
    return policy.public(tenant_id)


@router.delete("/v1/admin/tenants/{tenant_id}/moderation")
async def delete_policy(tenant_id: str, request: Request, platform: PlatformDep, key: AdminKey) -> dict[str, Any]:
    if not await asyncio.to_thread(ModerationPolicies(platform.db).delete, tenant_id):
        raise NotFoundError(f"tenant {tenant_id!r} has no moderation policy", param="tenant_id")
    await asyncio.to_thread(
        platform.audit.record,
        "moderation.policy.delete",
        tenant=key.tenant,
        key_id=key.id,
        target=tenant_id,
        client=request.client.host if request.client else None,
    )
    return {"object": "moderation_policy.deleted", "tenant": tenant_id, "deleted": True}
