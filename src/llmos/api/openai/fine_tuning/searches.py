"""/v1/fine_tuning/searches (scope `fine-tune`): hyperparameter searches whose trials are
fine-tuning jobs: create, list, retrieve, cancel, and the trials table; isolated per tenant."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Header, Query, Request

from llmos.api.deps import PlatformDep
from llmos.api.openai.chat.stored import json_object
from llmos.api.openai.fine_tuning.router import TuneKey
from llmos.errors import NotInstalledError
from llmos.training.search import EXTRA, available

if TYPE_CHECKING:
    from llmos.platform import Platform
    from llmos.training.search.runner import SearchRunner
    from llmos.training.search.service import SearchService

router = APIRouter(prefix="/v1/fine_tuning/searches", tags=["fine-tuning"])


def _searches(request: Request) -> SearchService:
    service: SearchService | None = getattr(request.app.state, "searches", None)
    if service is None:
        raise NotInstalledError(f"hyperparameter search needs Optuna and matplotlib: pip install 'llmos[{EXTRA}]'")
    return service


@router.post("")
async def create_search(
    request: Request,
    platform: PlatformDep,
    key: TuneKey,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
) -> dict[str, Any]:
    """Check the trials' job and the search space (every point a valid job), then queue the
    search for its runner (see docs/fine-tuning.md, Hyperparameter search)."""
    from llmos.training.search.request import FIELDS

    searches = _searches(request)
    body = await json_object(request, set(FIELDS))
    await asyncio.to_thread(platform.training_quota.check_cpu, key.tenant, key.id)  # 429 once spent
    await asyncio.to_thread(platform.files.require_room, key.tenant)  # 403 when no model could be stored
    search = await asyncio.to_thread(
        searches.create, tenant=key.tenant, key_id=key.id, body=body, idempotency_key=idempotency_key
    )
    platform.audit.record(
        "search.create",
        tenant=key.tenant,
        key_id=key.id,
        target=search.id,
        client=request.client.host if request.client else None,
        detail={"model": search.model},
    )
    return await asyncio.to_thread(searches.public, search)


@router.get("")
async def list_searches(
    request: Request,
    key: TuneKey,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    searches = _searches(request)
    found, has_more = await asyncio.to_thread(searches.store.page, key.tenant, after=after, limit=limit)
    data = [await asyncio.to_thread(searches.public, s) for s in found]
    return {"object": "list", "data": data, "has_more": has_more}


@router.get("/{search_id}")
async def retrieve_search(search_id: str, request: Request, key: TuneKey) -> dict[str, Any]:
    searches = _searches(request)
    search = await asyncio.to_thread(searches.store.get, key.tenant, search_id)
    return await asyncio.to_thread(searches.public, search)


@router.post("/{search_id}/cancel")
async def cancel_search(search_id: str, request: Request, platform: PlatformDep, key: TuneKey) -> dict[str, Any]:
    """Its runner cancels the running trials' jobs and finishes the search with what completed."""
    searches = _searches(request)
    search = await asyncio.to_thread(searches.store.cancel, key.tenant, search_id)
    client = request.client.host if request.client else None
    platform.audit.record("search.cancel", tenant=key.tenant, key_id=key.id, target=search.id, client=client)
    return await asyncio.to_thread(searches.public, search)


@router.get("/{search_id}/trials")
async def search_trials(search_id: str, request: Request, key: TuneKey) -> dict[str, Any]:
    """Every trial, oldest first: its point, state, value, intermediate values, job and model."""
    data = await asyncio.to_thread(_searches(request).trials, key.tenant, search_id)
    return {"object": "list", "data": data, "has_more": False}


def open_searches(platform: Platform, *, run: bool) -> tuple[SearchService | None, SearchRunner | None]:
    """The search service (None without the ``search`` extra) and, with ``run``, its runner thread, started."""
    if not available():
        return None, None
    from llmos.training.search.runner import SearchRunner
    from llmos.training.search.service import SearchService

    service = SearchService(platform.db, platform.settings.db_url, platform.registry, platform.files, platform.jobs)
    runner = SearchRunner(service, platform.jobs, platform.registry) if run else None
    if runner is not None:
        runner.start()
    return service, runner
