"""Usage accounting: requests and tokens by day, tenant, key, model and kind (chat, embeddings...),
and the CPU-seconds of training workers (kind ``fine-tune``)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError

from llmos.registry.db import Database
from llmos.registry.tables import UsageRow


@dataclass(frozen=True)
class UsageEntry:
    day: str
    tenant: str
    key_id: str
    model: str
    kind: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cpu_seconds: float = 0.0


TRAINING_KIND = "fine-tune"
TRAINING_KEY = "-"
"""Training usage is charged to the tenant, not to a key (a job outlives the key that created it)."""


def today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d")


class UsageLedger:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(
        self, *, tenant: str, key_id: str, model: str, kind: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        day = today()
        try:
            self._increment(day, tenant, key_id, model, kind, prompt_tokens, completion_tokens)
        except IntegrityError:  # another request created today's row first; add to it
            self._increment(day, tenant, key_id, model, kind, prompt_tokens, completion_tokens)

    def charge_training_cpu(self, *, tenant: str, model: str, seconds: float, key_id: str | None = None) -> None:
        """Add a training worker's CPU time to today's ``fine-tune`` row of ``tenant``, the key that
        created the job (``-`` for jobs older than per-key accounting) and ``model``."""
        day, key = today(), key_id or TRAINING_KEY
        try:
            self._increment(day, tenant, key, model, TRAINING_KIND, 0, 0, requests=0, cpu_seconds=seconds)
        except IntegrityError:
            self._increment(day, tenant, key, model, TRAINING_KIND, 0, 0, requests=0, cpu_seconds=seconds)

    def training_cpu_seconds(self, tenant: str, day: str | None = None, *, key_id: str | None = None) -> float:
        """CPU-seconds the tenant's training workers used on ``day`` (UTC, default today): all of
        them, or only the jobs of ``key_id``."""
        query = select(func.sum(UsageRow.cpu_seconds)).where(
            UsageRow.day == (day or today()), UsageRow.tenant == tenant, UsageRow.kind == TRAINING_KIND
        )
        if key_id is not None:
            query = query.where(UsageRow.key_id == key_id)
        with self.db.session() as s:
            return float(s.scalar(query) or 0.0)

    def _increment(
        self,
        day: str,
        tenant: str,
        key_id: str,
        model: str,
        kind: str,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        requests: int = 1,
        cpu_seconds: float = 0.0,
    ) -> None:
        with self.db.session() as s:
            row = s.get(UsageRow, (day, tenant, key_id, model, kind), with_for_update=True)
            if row is None:
                row = UsageRow(
                    day=day,
                    tenant=tenant,
                    key_id=key_id,
                    model=model,
                    kind=kind,
                    requests=0,
                    prompt_tokens=0,
                    completion_tokens=0,
                    cpu_seconds=0.0,
                )
                s.add(row)
            row.requests += requests
            row.prompt_tokens += prompt_tokens
            row.completion_tokens += completion_tokens
            row.cpu_seconds = (row.cpu_seconds or 0.0) + cpu_seconds

    def delete_older_than(self, days: int, *, now: datetime | None = None) -> int:
        """Delete the rows of days more than ``days`` days before ``now`` (the retention); returns how many went."""
        cutoff = ((now or datetime.now(UTC)) - timedelta(days=days)).strftime("%Y-%m-%d")
        with self.db.session() as s:
            return int(s.execute(delete(UsageRow).where(UsageRow.day < cutoff)).rowcount or 0)  # type: ignore[attr-defined]

    def query(self, *, tenant: str | None = None, since: str | None = None) -> list[UsageEntry]:
        with self.db.session() as s:
            q = select(UsageRow).order_by(UsageRow.day, UsageRow.tenant, UsageRow.model)
            if tenant is not None:
                q = q.where(UsageRow.tenant == tenant)
            if since is not None:
                q = q.where(UsageRow.day >= since)
            return [
                UsageEntry(
                    day=r.day,
                    tenant=r.tenant,
                    key_id=r.key_id,
                    model=r.model,
                    kind=r.kind,
                    requests=r.requests,
                    prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens,
                    cpu_seconds=round(r.cpu_seconds or 0.0, 3),
                )
                for r in s.scalars(q)
            ]
