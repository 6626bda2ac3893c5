from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from llmos.api.deps import AdminKey, EngineDep, SettingsDep

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/engine")
async def engine_stats(engine: EngineDep, _key: AdminKey) -> dict[str, Any]:
    """Resident models, pending requests and token counters of the inference engine."""
    stats = getattr(engine, "stats", None)
    return stats() if stats is not None else {}


@router.get("/settings")
async def settings_view(settings: SettingsDep, _key: AdminKey) -> dict[str, Any]:
    """The effective settings, secrets masked."""
    return settings.as_public_dict()
