"""Searches in the database: created once checked, asked to cancel, claimed by one server's
runner at a time (a heartbeat; a stale one is taken over, so a restart resumes the search), and
finished with their best trial and result files. Their trials live in Optuna's tables."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import or_, select, update

from llmos.errors import InvalidRequestError, NotFoundError
from llmos.kernel.job_record import timestamp
from llmos.kernel.leases import Leases
from llmos.registry.db import Database
from llmos.registry.files import FileStore
from llmos.registry.idempotency import find_earlier, insert_once
from llmos.registry.service import ModelRegistry
from llmos.registry.tables import SearchRow
from llmos.training.search.request import SearchRequest, check_search_request


class SearchStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({SearchStatus.SUCCEEDED, SearchStatus.FAILED, SearchStatus.CANCELLED})


@dataclass(frozen=True)
class Search:
    id: str
    tenant: str
    key_id: str | None
    model: str
    request: SearchRequest
    status: SearchStatus
    created_at: datetime
    finished_at: datetime | None = None
    error: dict[str, Any] | None = None
    best: dict[str, Any] | None = None
    fine_tuned_model: str | None = None
    result_files: list[str] = field(default_factory=list)
    metadata: dict[str, str] | None = None

    @classmethod
    def from_row(cls, row: SearchRow) -> Search:
        return cls(
            id=row.id,
            tenant=row.tenant,
            key_id=row.key_id,
            model=row.model,
            request=SearchRequest.from_json(row.request),
            status=SearchStatus(row.status),
            created_at=row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC),
            finished_at=row.finished_at,
            error=row.error,
            best=row.best,
            fine_tuned_model=row.fine_tuned_model,
            result_files=list(row.result_files or []),
            metadata=dict(row.search_metadata) if row.search_metadata is not None else None,
        )

    def public(self, trials: dict[str, int], cpu_seconds: float) -> dict[str, Any]:
        """The ``fine_tuning.search`` object: the request as checked, trial counts, the outcome."""
        r = self.request
        return {
            "id": self.id,
            "object": "fine_tuning.search",
            "created_at": timestamp(self.created_at),
            "finished_at": timestamp(self.finished_at),
            "model": self.model,
            "status": self.status.value,
            "training_file": r.template["training_file"],
            "validation_file": r.template["validation_file"],
            "seed": r.template["seed"],
            "search_space": r.space,
            "sampler": r.sampler,
            "pruner": r.pruner,
            "objective": {"metric": r.metric, "direction": r.direction},
            "budget": {"max_trials": r.max_trials, "max_wall_seconds": r.max_wall_seconds},
            "parallelism": r.parallelism,
            "trials": trials,
            "best_trial": self.best,
            "fine_tuned_model": self.fine_tuned_model,
            "result_files": self.result_files,
            "error": self.error,
            "metadata": self.metadata,
            "cpu_seconds": round(cpu_seconds, 3),
        }


class SearchStore:
    def __init__(
        self,
        db: Database,
        registry: ModelRegistry,
        files: FileStore,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db, self.registry, self.files, self.clock = db, registry, files, clock
        unfinished = [status for status in SearchStatus if status not in FINISHED]
        self.leases = Leases(db, SearchRow, unfinished, clock=lambda: self.clock())

    def create(
        self, *, tenant: str, key_id: str | None, body: dict[str, Any], idempotency_key: str | None = None
    ) -> Search:
        """Check the request and store the search, queued for a runner; nothing is stored on error."""
        request_hash = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        if idempotency_key is not None:
            earlier = find_earlier(self.db, SearchRow, tenant, idempotency_key, request_hash)
            if earlier is not None:
                return Search.from_row(earlier)
        request, metadata = check_search_request(self.registry, self.files, tenant, body)
        row = SearchRow(
            id=f"ftsearch-{uuid.uuid4().hex[:24]}",
            tenant=tenant,
            key_id=key_id,
            model=str(body["model"]),
            request=request.as_json(),
            status=SearchStatus.QUEUED,
            search_metadata=metadata,
            created_at=self.clock(),
            idempotency_key=idempotency_key,
            request_hash=request_hash,
        )
        stored, _ = insert_once(self.db, row)
        return Search.from_row(stored)

    def get(self, tenant: str | None, search_id: str) -> Search:
        """The search (``tenant`` None: whoever owns it); another tenant's does not exist."""
        with self.db.session() as s:
            row = s.get(SearchRow, search_id)
            if row is None or (tenant is not None and row.tenant != tenant):
                raise NotFoundError(f"No such search: {search_id[:80]}", param="search_id")
            return Search.from_row(row)

    def page(self, tenant: str, *, after: str | None = None, limit: int = 20) -> tuple[list[Search], bool]:
        """The tenant's searches, newest first, after the search ``after``; and whether more follow."""
        with self.db.session() as s:
            q = select(SearchRow).where(SearchRow.tenant == tenant)
            if after is not None:
                cursor = s.get(SearchRow, after)
                if cursor is None or cursor.tenant != tenant:
                    raise NotFoundError(f"No such search: {after[:80]}", param="after")
                q = q.where(
                    or_(
                        SearchRow.created_at < cursor.created_at,
                        (SearchRow.created_at == cursor.created_at) & (SearchRow.id < cursor.id),
                    )
                )
            rows = list(s.scalars(q.order_by(SearchRow.created_at.desc(), SearchRow.id.desc()).limit(limit + 1)))
            return [Search.from_row(r) for r in rows[:limit]], len(rows) > limit

    def cancel(self, tenant: str, search_id: str) -> Search:
        """Ask the search to stop: its runner cancels its running trials and writes what it found."""
        search = self.get(tenant, search_id)
        if search.status in FINISHED:
            raise InvalidRequestError(
                f"search {search_id} is {search.status.value}", param="search_id", code="invalid_search_state"
            )
        with self.db.session() as s:
            s.execute(
                update(SearchRow)
                .where(SearchRow.id == search_id, SearchRow.status.in_([SearchStatus.QUEUED, SearchStatus.RUNNING]))
                .values(status=SearchStatus.CANCELLING)
            )
        return self.get(tenant, search_id)

    # -- what a runner does ----------------------------------------------------------------
    def claim(self, owner: str, stale_after: timedelta) -> list[Search]:
        """Unfinished searches nobody drives (new, released, or their owner's heartbeat stale), now ``owner``'s."""
        claimed = []
        for search_id in self.leases.claim(owner, stale_after):
            with self.db.session() as s:
                s.execute(
                    update(SearchRow)
                    .where(SearchRow.id == search_id, SearchRow.status == SearchStatus.QUEUED)
                    .values(status=SearchStatus.RUNNING)
                )
            claimed.append(self.get(None, search_id))
        return claimed

    def beat(self, owner: str, search_ids: list[str]) -> dict[str, Search]:
        """Renew ``owner``'s hold on its searches; the ones it still holds, as they are now."""
        held = self.leases.beat(owner, search_ids)
        if not held:
            return {}
        with self.db.session() as s:
            return {row.id: Search.from_row(row) for row in s.scalars(select(SearchRow).where(SearchRow.id.in_(held)))}

    def release(self, owner: str, search_id: str) -> None:
        """Give a search up (this server stops): the next runner to look resumes it at once."""
        self.leases.release(owner, search_id)

    def finish(
        self,
        search_id: str,
        owner: str,
        status: SearchStatus,
        *,
        best: dict[str, Any] | None,
        result_files: list[str],
        error: dict[str, Any] | None = None,
    ) -> bool:
        """A held search's outcome; False if ``owner`` no longer held it (another runner finishes it)."""
        with self.db.session() as s:
            done = s.execute(
                update(SearchRow)
                .where(SearchRow.id == search_id, SearchRow.owner == owner, SearchRow.status.notin_(FINISHED))
                .values(
                    status=status,
                    best=best,
                    fine_tuned_model=(best or {}).get("fine_tuned_model"),
                    result_files=result_files,
                    error=error,
                    finished_at=self.clock(),
                    owner=None,
                )
            )
            return bool(getattr(done, "rowcount", 0))
