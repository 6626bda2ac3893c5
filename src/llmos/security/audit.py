"""Append-only audit log of security-relevant actions; the API reads it, never rewrites it.
Denied requests arrive aggregated (see ``denied``); rows past the retention are deleted."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select

from llmos.registry.db import Database
from llmos.registry.tables import AuditRow
from llmos.security.denied import DeniedRequests

log = logging.getLogger("llmos.audit")


@dataclass(frozen=True)
class AuditEvent:
    id: int
    at: datetime
    tenant: str | None
    key_id: str | None
    action: str
    target: str | None
    outcome: str
    client: str | None
    detail: dict[str, Any]


class AuditLog:
    def __init__(self, db: Database, denied: DeniedRequests | None = None) -> None:
        self.db = db
        self.denied = denied or DeniedRequests()

    def record(
        self,
        action: str,
        *,
        outcome: str = "success",
        tenant: str | None = None,
        key_id: str | None = None,
        target: str | None = None,
        client: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        try:
            with self.db.session() as s:
                s.add(
                    AuditRow(
                        at=datetime.now(UTC),
                        tenant=tenant,
                        key_id=key_id,
                        action=action,
                        target=target[:512] if target else None,
                        outcome=outcome,
                        client=client,
                        detail=detail or {},
                    )
                )
        except Exception:  # an audit write must never turn a served request into a failure
            log.exception("could not write audit event %s", action)

    def flush_denied(self) -> int:
        """Write the denied requests tallied since the last flush, one row per address, route and
        key (``detail``: ``count``, ``throttled`` (answered 429), ``codes``, ``first_at``); returns the rows."""
        tallies = self.denied.drain()
        if not tallies:
            return 0
        try:
            with self.db.session() as s:
                s.add_all(
                    AuditRow(
                        at=t.last_at,
                        tenant=t.tenant,
                        key_id=t.key_id,
                        action="auth.denied",
                        target=t.route[:512],
                        outcome="denied",
                        client=t.client,
                        detail={
                            "count": t.count,
                            "throttled": t.throttled,
                            "codes": dict(t.codes),
                            "first_at": int(t.first_at.timestamp()),
                        },
                    )
                    for t in tallies
                )
        except Exception:  # like any audit write: never a failure of what triggered it
            log.exception("could not write %d denied-request tallies", len(tallies))
            return 0
        return len(tallies)

    def delete_older_than(self, days: int, *, now: datetime | None = None) -> int:
        """Delete events older than ``days`` days (the retention); returns how many went."""
        cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
        with self.db.session() as s:
            return int(s.execute(delete(AuditRow).where(AuditRow.at < cutoff)).rowcount or 0)  # type: ignore[attr-defined]

    def query(
        self, *, tenant: str | None = None, action: str | None = None, after: int | None = None, limit: int = 100
    ) -> list[AuditEvent]:
        self.flush_denied()  # a reader sees denied requests up to now
        with self.db.session() as s:
            q = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit)
            if tenant is not None:
                q = q.where(AuditRow.tenant == tenant)
            if action is not None:
                q = q.where(AuditRow.action == action)
            if after is not None:
                q = q.where(AuditRow.id < after)
            return [
                AuditEvent(
                    id=r.id,
                    at=r.at if r.at.tzinfo else r.at.replace(tzinfo=UTC),
                    tenant=r.tenant,
                    key_id=r.key_id,
                    action=r.action,
                    target=r.target,
                    outcome=r.outcome,
                    client=r.client,
                    detail=dict(r.detail or {}),
                )
                for r in s.scalars(q)
            ]
