"""Append-only audit log of security-relevant actions; the API reads it, never rewrites it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from llmos.registry.db import Database
from llmos.registry.tables import AuditRow

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
    def __init__(self, db: Database) -> None:
        self.db = db

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

    def query(
        self, *, tenant: str | None = None, action: str | None = None, after: int | None = None, limit: int = 100
    ) -> list[AuditEvent]:
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
