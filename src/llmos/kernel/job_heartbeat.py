"""A job worker's heartbeat in the database: the one statement that records it, used by the job
store and by a worker from its first moments. It imports nothing of the training stack (torch,
transformers), so a worker beats before it loads that, which takes many seconds on a busy node and
would otherwise read as a silent, dead worker (the supervisor's window is 30 s)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, update

from llmos.kernel.job_status import JobStatus, StopRequest
from llmos.registry.db import Database
from llmos.registry.tables import JobRow

EXIT_STOPPED = 3
"""A worker's exit code when it stopped as asked (cancel, pause, a lost lease, an orphaned worker)."""


def beat(db: Database, job_id: str, attempt: int, now: datetime) -> str | None:
    """The worker of ``attempt`` is alive: record it, and answer what is asked of it (a
    ``StopRequest``); ``LOST`` once the job is no longer that attempt's to run (a supervisor judged
    the worker gone after its heartbeat fell silent, and the job moved on)."""
    with db.session() as s:
        mine = (JobRow.id == job_id, JobRow.status == JobStatus.RUNNING, JobRow.attempts == attempt)
        recorded = s.execute(
            update(JobRow).where(*mine).values(heartbeat_at=now).execution_options(synchronize_session=False)
        )
        if not getattr(recorded, "rowcount", 0):
            return StopRequest.LOST
        return s.scalar(select(JobRow.control).where(JobRow.id == job_id))
