"""Usage accounting: requests and tokens by day, tenant, key, model and kind (chat, embeddings...)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
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


class UsageLedger:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(
        self, *, tenant: str, key_id: str, model: str, kind: str, prompt_tokens: int, completion_tokens: int
    ) -> None:
        day = datetime.now(UTC).strftime("%Y-%m-%d")
        try:
            self._increment(day, tenant, key_id, model, kind, prompt_tokens, completion_tokens)
        except IntegrityError:  # another request created today's row first; add to it
            self._increment(day, tenant, key_id, model, kind, prompt_tokens, completion_tokens)

    def _increment(
        self, day: str, tenant: str, key_id: str, model: str, kind: str, prompt_tokens: int, completion_tokens: int
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
                )
                s.add(row)
            row.requests += 1
            row.prompt_tokens += prompt_tokens
            row.completion_tokens += completion_tokens

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
                )
                for r in s.scalars(q)
            ]
