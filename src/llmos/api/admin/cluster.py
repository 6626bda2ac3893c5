"""``GET /v1/admin/cluster`` (admin scope): the nodes, the engine's replicas on them and the
fine-tuning jobs this server runs and their nodes; in single-process mode, this machine and its
resident models."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastapi import APIRouter, Request

from llmos.api.deps import AdminKey, EngineDep, PlatformDep
from llmos.cluster.machine import single_process_view
from llmos.cluster.view import ClusterEngine, JobView
from llmos.errors import NotFoundError
from llmos.kernel.jobs import JobStore
from llmos.kernel.supervisor import JobSupervisor

router = APIRouter(prefix="/v1/admin", tags=["admin"])


@router.get("/cluster")
async def cluster_view(request: Request, engine: EngineDep, platform: PlatformDep, _key: AdminKey) -> dict[str, Any]:
    """Nodes with their resources, each engine replica's model, node, queue depth and adapters, and
    the jobs this server runs with the node each runs on and the memory and GPUs it reserves there."""
    if isinstance(engine, ClusterEngine):
        view = await engine.cluster_view()
    else:
        view = await asyncio.to_thread(single_process_view, engine.stats())
    supervisor: JobSupervisor | None = getattr(request.app.state, "supervisor", None)
    jobs = await asyncio.to_thread(_jobs_here, platform.jobs, supervisor, view.server_node)
    return dataclasses.replace(view, jobs=jobs).public()


def _jobs_here(jobs: JobStore, supervisor: JobSupervisor | None, server_node: str) -> list[JobView]:
    """The jobs whose workers this server's supervisor runs, each on its node (a Ray cluster node in
    cluster mode, else the server's own; another server on the database lists its own), with what
    its worker reserves there."""
    placed = []
    for job_id, placement in (supervisor.placements if supervisor is not None else {}).items():
        try:
            job = jobs.get(None, job_id)
        except NotFoundError:  # deleted since
            continue
        node = placement.node_id or server_node
        placed.append(
            JobView(job.id, job.model, job.tenant, job.status.value, node, placement.memory_bytes, placement.gpus)
        )
    return placed
