"""Tenants: who owns files, jobs, fine-tuned models and usage; each with its own limits."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from llmos.errors import ConflictError, InvalidRequestError, NotFoundError
from llmos.registry.db import Database
from llmos.registry.tables import TenantRow
from llmos.security.limits import Limits

_TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
SYSTEM_OWNER = "system"  # owner of shared base models; not a tenant anyone can be
CACHE_TTL_S = 2.0
"""How long ``TenantStore.current`` trusts what it read: a change made through another process
(another server on the database, the CLI) takes effect within this; through this one, at once."""


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    limits: Limits
    created_at: datetime
    disabled: bool

    @classmethod
    def from_row(cls, row: TenantRow) -> Tenant:
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        return cls(
            id=row.id,
            name=row.name,
            limits=Limits.parse(row.limits),
            created_at=created,
            disabled=row.disabled_at is not None,
        )

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "tenant",
            "name": self.name,
            "limits": self.limits.as_dict(),
            "created_at": int(self.created_at.timestamp()),
            "disabled": self.disabled,
        }


def check_tenant_id(tenant_id: str) -> str:
    if not _TENANT_ID.fullmatch(tenant_id) or tenant_id == SYSTEM_OWNER:
        raise InvalidRequestError(
            "tenant id must be 1-63 lowercase letters, digits or '-' (and not 'system')", param="id"
        )
    return tenant_id


class TenantStore:
    def __init__(self, db: Database, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self._clock = clock
        self._cache: dict[str, tuple[float, Tenant]] = {}
        self._lock = threading.Lock()

    def create(self, tenant_id: str, *, name: str | None = None, limits: Limits | None = None) -> Tenant:
        check_tenant_id(tenant_id)
        with self.db.session() as s:
            if s.get(TenantRow, tenant_id) is not None:
                raise ConflictError(f"tenant {tenant_id!r} already exists", param="id")
            row = TenantRow(
                id=tenant_id,
                name=(name or tenant_id)[:256],
                limits=(limits or Limits()).as_dict(),
                created_at=datetime.now(UTC),
            )
            s.add(row)
            s.flush()
            return Tenant.from_row(row)

    def get(self, tenant_id: str) -> Tenant:
        with self.db.session() as s:
            row = s.get(TenantRow, tenant_id)
            if row is None:
                raise NotFoundError(f"no tenant {tenant_id!r}", param="tenant")
            return Tenant.from_row(row)

    def current(self, tenant_id: str) -> Tenant:
        """``get``, remembered for ``CACHE_TTL_S``: every request asks whether its tenant is
        enabled and what its limits are, and tenants change rarely."""
        now = self._clock()
        with self._lock:
            hit = self._cache.get(tenant_id)
        if hit is not None and now - hit[0] < CACHE_TTL_S:
            return hit[1]
        tenant = self.get(tenant_id)
        with self._lock:
            self._cache[tenant_id] = (now, tenant)
        return tenant

    def list(self) -> list[Tenant]:
        with self.db.session() as s:
            return [Tenant.from_row(r) for r in s.scalars(select(TenantRow).order_by(TenantRow.id))]

    def update(
        self, tenant_id: str, *, name: str | None = None, limits: Limits | None = None, disabled: bool | None = None
    ) -> Tenant:
        with self.db.session() as s:
            row = s.get(TenantRow, tenant_id)
            if row is None:
                raise NotFoundError(f"no tenant {tenant_id!r}", param="tenant")
            if name is not None:
                row.name = name[:256]
            if limits is not None:
                row.limits = limits.as_dict()
            if disabled is not None:
                row.disabled_at = datetime.now(UTC) if disabled else None
            s.flush()
            tenant = Tenant.from_row(row)
        with self._lock:
            self._cache.pop(tenant_id, None)
        return tenant
