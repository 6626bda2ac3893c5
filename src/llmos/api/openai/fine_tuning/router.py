"""/v1/fine_tuning/jobs (scope `fine-tune`): create, list, retrieve, cancel, pause, resume,
events and checkpoints, isolated per tenant."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request

from llmos.api.context import limited
from llmos.api.deps import PlatformDep
from llmos.api.openai.chat.stored import json_object
from llmos.registry.db import parse_db_int
from llmos.security import ApiKeyInfo
from llmos.training.preflight import check_job_body

router = APIRouter(prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
TuneKey = Annotated[ApiKeyInfo, Depends(limited("fine-tune"))]  # its limits apply as to inference
_FIELDS = {
    "model",
    "training_file",
    "validation_file",
    "suffix",
    "seed",
    "method",
    "hyperparameters",
    "integrations",
    "metadata",
    "priority",
}


@router.post("")
async def create_job(
    request: Request,
    platform: PlatformDep,
    key: TuneKey,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> dict[str, Any]:
    """Validate the files, model and method, then queue the job (see docs/fine-tuning.md)."""
    body = await json_object(request, _FIELDS)  # tenant, owner, paths... are never taken from a request
    await asyncio.to_thread(platform.training_quota.check_cpu, key.tenant, key.id)  # 429 once spent
    await asyncio.to_thread(platform.files.require_room, key.tenant)  # 403 when its model could not be stored
    # What would fail only once training has started (e.g. target_modules the model lacks) is refused now.
    await asyncio.to_thread(check_job_body, platform.registry, platform.files, key.tenant, body)
    job = await asyncio.to_thread(
        platform.jobs.create, tenant=key.tenant, key_id=key.id, body=body, idempotency_key=idempotency_key
    )
    platform.audit.record(
        "job.create",
        tenant=key.tenant,
        key_id=key.id,
        target=job.id,
        client=request.client.host if request.client else None,
        detail={"model": job.model},
    )
    return job.public()


@router.get("")
async def list_jobs(
    platform: PlatformDep,
    key: TuneKey,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    jobs, has_more = await asyncio.to_thread(platform.jobs.list, key.tenant, after=after, limit=limit)
    return {"object": "list", "data": [j.public() for j in jobs], "has_more": has_more}


@router.get("/{job_id}")
async def retrieve_job(job_id: str, platform: PlatformDep, key: TuneKey) -> dict[str, Any]:
    return (await asyncio.to_thread(platform.jobs.get, key.tenant, job_id)).public()


@router.post("/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request, platform: PlatformDep, key: TuneKey) -> dict[str, Any]:
    job = await asyncio.to_thread(platform.jobs.cancel, key.tenant, job_id)  # of concurrent cancels, one wins
    client = request.client.host if request.client else None
    platform.audit.record("job.cancel", tenant=key.tenant, key_id=key.id, target=job.id, client=client)
    return job.public()


@router.post("/{job_id}/pause")
async def pause_job(job_id: str, platform: PlatformDep, key: TuneKey) -> dict[str, Any]:
    return (await asyncio.to_thread(platform.jobs.pause, key.tenant, job_id)).public()


@router.post("/{job_id}/resume")
async def resume_job(job_id: str, platform: PlatformDep, key: TuneKey) -> dict[str, Any]:
    return (await asyncio.to_thread(platform.jobs.resume, key.tenant, job_id)).public()


@router.get("/{job_id}/events")
async def job_events(
    job_id: str,
    platform: PlatformDep,
    key: TuneKey,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    cursor = parse_db_int(after.removeprefix("ftevent-"), param="after") if after else None
    events, has_more = await asyncio.to_thread(platform.jobs.events, key.tenant, job_id, after=cursor, limit=limit)
    return {"object": "list", "data": events, "has_more": has_more}


@router.get("/{job_id}/checkpoints")
async def job_checkpoints(
    job_id: str,
    platform: PlatformDep,
    key: TuneKey,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict[str, Any]:
    data, has_more = await asyncio.to_thread(platform.jobs.checkpoints, key.tenant, job_id, after=after, limit=limit)
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
