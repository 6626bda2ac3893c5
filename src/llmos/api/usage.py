"""GET /v1/usage: a tenant's own usage; an admin may ask for any tenant or all."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

from fastapi import APIRouter, Query

from llmos.api.deps import InferenceKey, PlatformDep
from llmos.errors import InvalidRequestError

router = APIRouter(tags=["usage"])
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@router.get("/v1/usage")
async def usage(
    platform: PlatformDep,
    key: InferenceKey,
    since: Annotated[str | None, Query(description="First day, YYYY-MM-DD.")] = None,
    tenant: Annotated[str | None, Query(max_length=63, description="Admins only: another tenant.")] = None,
) -> dict[str, Any]:
    """Requests and tokens by day, key, model and kind."""
    if since is not None and not _DAY.fullmatch(since):
        raise InvalidRequestError("since must be a date as YYYY-MM-DD", param="since")
    if "admin" not in key.scopes:
        tenant = key.tenant  # a tenant sees its own usage only, whatever it asks
    rows = await asyncio.to_thread(platform.usage.query, tenant=tenant, since=since)
    return {"object": "list", "data": [{"object": "usage", **r.__dict__} for r in rows]}
