"""``GET /v1/admin/cluster`` (admin scope): the Ray cluster's nodes and the engine's replicas."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from llmos.api.deps import AdminKey, EngineDep
from llmos.cluster.view import ClusterEngine
from llmos.errors import NotFoundError

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/cluster")
async def cluster_view(engine: EngineDep, _key: AdminKey) -> dict[str, Any]:
    """Nodes with their resources, and each engine replica's model, node, queue depth and adapters."""
    if not isinstance(engine, ClusterEngine):
        raise NotFoundError("Ray cluster mode is off: set ray_address (or llmos serve --ray)", code="cluster_mode_off")
    return (await engine.cluster_view()).public()
