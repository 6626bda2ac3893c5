"""A training worker's CPU time, charged as it runs to its job and to its tenant's and key's usage,
and checked against their training CPU quotas (see ``llmos.security.quotas``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from llmos.security.quotas import TrainingQuota

if TYPE_CHECKING:
    from llmos.kernel.jobs import JobStore

QUOTA_STOP = "quota_exceeded"
"""The control reason a worker stops with when its tenant's training CPU quota is spent."""


class CpuMeter:
    """Charges the CPU time this process used since the last charge (all its threads, from its
    start: ``time.process_time``) to the job's ``cpu_seconds`` and the tenant's usage for today."""

    def __init__(
        self,
        jobs: JobStore,
        quota: TrainingQuota,
        job_id: str,
        clock: Callable[[], float] = time.process_time,
    ) -> None:
        self.jobs, self.quota, self.job_id = jobs, quota, job_id
        self._clock = clock
        self._charged = 0.0
        self._lock = threading.Lock()
        self.over_quota: str | None = None
        """Why the job must stop (the 429 message), once the tenant's quota is spent."""

    def charge(self) -> str | None:
        """Charge what was used since the last call; return the quota message once it is spent."""
        with self._lock:
            used = self._clock()
            seconds, self._charged = max(0.0, used - self._charged), used
            job = self.jobs.charge_cpu(self.job_id, seconds)
            if job is None:
                return None
            if seconds:
                self.quota.usage.charge_training_cpu(
                    tenant=job.tenant, model=job.model, seconds=seconds, key_id=job.key_id
                )
            error = self.quota.cpu_error(job.tenant, job.key_id)
            self.over_quota = error.message if error is not None else None
            return self.over_quota
