"""Training quotas: ``training_cpu_seconds`` per UTC day and ``max_concurrent_jobs``, for the
tenant and for the API key that created the job (a key's limits apply besides its tenant's, so
the tighter one wins and a key can never loosen its tenant's).

Training workers' CPU time is charged as they run (``UsageLedger.charge_training_cpu``), to the
tenant and to the job's key. Once a day's CPU limit is reached, new jobs are refused (429
``quota_exceeded`` with ``Retry-After`` until the next UTC midnight), queued jobs wait for the
window to reset, and a running job is stopped at its next step and failed with
``quota_exceeded`` (checkpoints kept, so it can be resumed once the window has reset).
"""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime, timedelta

from llmos.errors import NotFoundError, RateLimitError
from llmos.monitoring import metrics
from llmos.security.keys import KeyStore
from llmos.security.limits import Limits
from llmos.security.tenants import TenantStore
from llmos.security.usage import UsageLedger


def seconds_until_reset(now: datetime | None = None) -> float:
    """Seconds until the next UTC midnight, when the day's training CPU window starts afresh."""
    now = now or datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1.0, (midnight - now).total_seconds())


class TrainingQuota:
    def __init__(self, tenants: TenantStore, keys: KeyStore, usage: UsageLedger) -> None:
        self.tenants, self.keys, self.usage = tenants, keys, usage

    def limits(self, tenant: str, key_id: str | None) -> list[tuple[str, str | None, Limits]]:
        """(who, key id or None, limits) for the tenant and, when known, the key."""
        subjects: list[tuple[str, str | None, Limits]] = []
        with contextlib.suppress(NotFoundError):
            subjects.append((f"tenant {tenant}", None, self.tenants.get(tenant).limits))
        if key_id is not None:
            with contextlib.suppress(NotFoundError):
                subjects.append((f"API key {key_id}", key_id, self.keys.get(key_id).limits))
        return subjects

    def cpu_error(self, tenant: str, key_id: str | None = None) -> RateLimitError | None:
        """The 429 to answer with if the tenant or the key has spent today's training CPU, else None."""
        for who, key, limits in self.limits(tenant, key_id):
            limit = limits.training_cpu_seconds
            if limit is None:
                continue
            used = self.usage.training_cpu_seconds(tenant, key_id=key)
            if used >= limit:
                wait = seconds_until_reset()
                return RateLimitError(
                    f"Training CPU quota exceeded for {who}: {used:.0f} of {limit} CPU-seconds used today (UTC); "
                    f"the quota resets in {wait / 3600:.1f} h.",
                    retry_after=wait,
                    code="quota_exceeded",
                )
        return None

    def check_cpu(self, tenant: str, key_id: str | None = None) -> None:
        """Raise 429 ``quota_exceeded`` if the tenant or the key has spent today's training CPU."""
        error = self.cpu_error(tenant, key_id)
        if error is not None:
            metrics.QUOTA_REJECTIONS.labels(tenant, error.code or "quota_exceeded").inc()
            raise error

    def job_slot_free(self, tenant: str, key_id: str | None, running: dict[str | None, int]) -> bool:
        """Whether a queued job may start, given running jobs counted per key (``None``: the tenant)."""
        for _, key, limits in self.limits(tenant, key_id):
            if limits.max_concurrent_jobs is not None and running.get(key, 0) >= limits.max_concurrent_jobs:
                return False
        return True
