"""The training CPU quota: ``training_cpu_seconds`` per tenant per UTC day.

Training workers' CPU time is charged as they run (``UsageLedger.charge_training_cpu``). Once a
tenant's total for the day reaches its limit, new jobs are refused (429 ``quota_exceeded`` with
``Retry-After`` until the next UTC midnight), its queued jobs wait for the window to reset, and a
running job is stopped at its next step and failed with ``quota_exceeded`` (checkpoints kept, so
it can be resumed once the window has reset).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from llmos.errors import RateLimitError
from llmos.security.limits import Limits
from llmos.security.usage import UsageLedger


def seconds_until_reset(now: datetime | None = None) -> float:
    """Seconds until the next UTC midnight, when the day's training CPU window starts afresh."""
    now = now or datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1.0, (midnight - now).total_seconds())


def training_quota_error(tenant: str, limits: Limits, usage: UsageLedger) -> RateLimitError | None:
    """The error to answer with if ``tenant`` has spent its training CPU quota today, else None."""
    limit = limits.training_cpu_seconds
    if limit is None:
        return None
    used = usage.training_cpu_seconds(tenant)
    if used < limit:
        return None
    wait = seconds_until_reset()
    return RateLimitError(
        f"Training CPU quota exceeded for tenant {tenant}: {used:.0f} of {limit} CPU-seconds used today (UTC); "
        f"the quota resets in {wait / 3600:.1f} h.",
        retry_after=wait,
        code="quota_exceeded",
    )


def check_training_quota(tenant: str, limits: Limits, usage: UsageLedger) -> None:
    """Raise 429 ``quota_exceeded`` if ``tenant`` has spent its training CPU quota today."""
    error = training_quota_error(tenant, limits, usage)
    if error is not None:
        raise error
