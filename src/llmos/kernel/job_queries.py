"""What the platform reads about fine-tuning jobs: a job, a tenant's jobs, events and
checkpoints (OpenAI's list objects), and what a supervisor needs to schedule them. Nothing
here writes; ``JobStore`` (kernel/jobs.py) adds every change on top."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from llmos.errors import NotFoundError
from llmos.kernel.job_record import Job, checkpoint_name, fine_tuned_name, timestamp
from llmos.kernel.job_status import JobStatus
from llmos.registry.db import Database
from llmos.registry.tables import JobCheckpointRow, JobEventRow, JobRow, ModelRow

JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
_CHECKPOINT_ID = re.compile(r"^ftckpt-[0-9a-f]{24}$")


def _aware(value: datetime | None) -> datetime | None:
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class JobQueries:
    def __init__(self, db: Database, clock: Callable[[], datetime]) -> None:
        self.db = db
        self.clock = clock

    def get(self, tenant: str | None, job_id: str) -> Job:
        """The job (``tenant`` None: whoever owns it); another tenant's job does not exist."""
        with self.db.session() as s:
            return Job.from_row(self._row(s, tenant, job_id))

    def events(
        self, tenant: str, job_id: str, *, after: int | None = None, limit: int = 20
    ) -> tuple[list[dict[str, Any]], bool]:
        """The job's events, newest first, older than event ``after``; and whether more follow."""
        with self.db.session() as s:
            self._row(s, tenant, job_id)
            q = select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id.desc())
            if after is not None:
                q = q.where(JobEventRow.id < after)
            rows = list(s.scalars(q.limit(limit + 1)))
            return [
                {
                    "id": f"ftevent-{e.id}",
                    "object": "fine_tuning.job.event",
                    "created_at": timestamp(e.created_at),
                    "level": e.level,
                    "message": e.message,
                    "type": e.type,
                    "data": e.data,
                }
                for e in rows[:limit]
            ], len(rows) > limit

    def checkpoints(
        self, tenant: str, job_id: str, *, after: str | None = None, limit: int = 10
    ) -> tuple[list[dict[str, Any]], bool]:
        """The job's checkpoints, latest step first, after checkpoint ``after``; and whether more follow."""
        with self.db.session() as s:
            job = Job.from_row(self._row(s, tenant, job_id))
            base = s.get(ModelRow, job.base_model_id)
            result_name = fine_tuned_name(job, base.name if base is not None else job.model)
            q = select(JobCheckpointRow).where(JobCheckpointRow.job_id == job_id)
            if after is not None:
                cursor = s.get(JobCheckpointRow, after) if _CHECKPOINT_ID.fullmatch(after) else None
                if cursor is None or cursor.job_id != job_id:
                    return [], False
                q = q.where(JobCheckpointRow.step < cursor.step)
            rows = list(s.scalars(q.order_by(JobCheckpointRow.step.desc()).limit(limit + 1)))
            return [
                {
                    "id": c.id,
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": timestamp(c.created_at),
                    "fine_tuning_job_id": job_id,
                    "step_number": c.step,
                    "metrics": c.metrics,
                    "fine_tuned_model_checkpoint": checkpoint_name(result_name, c.step),
                }
                for c in rows[:limit]
            ], len(rows) > limit

    # -- what a supervisor reads ---------------------------------------------------------
    def queued(self) -> list[Job]:
        """Jobs waiting for a worker, highest priority first, then oldest."""
        with self.db.session() as s:
            q = select(JobRow).where(JobRow.status == JobStatus.QUEUED)
            return [Job.from_row(r) for r in s.scalars(q.order_by(JobRow.priority.desc(), JobRow.created_at))]

    def running_owners(self) -> list[tuple[str, str | None]]:
        """(tenant, key id) of every running job, whichever server runs it."""
        with self.db.session() as s:
            q = select(JobRow.tenant, JobRow.key_id).where(JobRow.status == JobStatus.RUNNING)
            return [(tenant, key_id) for tenant, key_id in s.execute(q)]

    def watch(self, job_ids: list[str]) -> dict[str, tuple[str | None, datetime | None]]:
        """Each running job's stop request and last heartbeat."""
        with self.db.session() as s:
            q = select(JobRow.id, JobRow.control, JobRow.heartbeat_at).where(
                JobRow.id.in_(job_ids), JobRow.status == JobStatus.RUNNING
            )
            return {job_id: (control, _aware(beat)) for job_id, control, beat in s.execute(q)}

    # -- what the metrics read ------------------------------------------------------------
    def status_counts(self) -> dict[str, int]:
        """How many jobs are in each status (statuses without jobs left out)."""
        with self.db.session() as s:
            q = select(JobRow.status, func.count()).group_by(JobRow.status)
            return {status: count for status, count in s.execute(q)}

    def running_metrics(self) -> dict[str, dict[str, Any]]:
        """Each running job's latest training report (its newest ``metrics`` event's data), as its
        worker process wrote it; a running job without a report yet maps to ``{}``."""
        with self.db.session() as s:
            running = list(s.scalars(select(JobRow.id).where(JobRow.status == JobStatus.RUNNING)))
            latest = (
                select(JobEventRow.job_id, func.max(JobEventRow.id))
                .where(JobEventRow.job_id.in_(running), JobEventRow.type == "metrics")
                .group_by(JobEventRow.job_id)
            )
            newest = [event_id for _, event_id in s.execute(latest)]
            reports: dict[str, dict[str, Any]] = {job_id: {} for job_id in running}
            for row in s.scalars(select(JobEventRow).where(JobEventRow.id.in_(newest))):
                reports[row.job_id] = dict(row.data or {})
            return reports

    def validation_values(self, job_id: str, metric: str) -> list[tuple[int, float]]:
        """Each ``(epoch, value)`` of ``metric`` the job's validation reports gave, oldest first
        (what a search reports to its trial as intermediate values)."""
        with self.db.session() as s:
            q = select(JobEventRow.data).where(JobEventRow.job_id == job_id, JobEventRow.type == "metrics")
            return [
                (data["epoch"], float(data[metric]))
                for data in s.scalars(q.order_by(JobEventRow.id))
                if data and isinstance(data.get(metric), int | float) and isinstance(data.get("epoch"), int)
            ]

    def silent(self, older_than: timedelta) -> list[str]:
        """Running jobs whose worker has not written a heartbeat for ``older_than``: their worker
        is gone (it dies with the server that started it), wherever that server ran."""
        cutoff = self.clock() - older_than
        with self.db.session() as s:
            q = select(JobRow.id).where(
                JobRow.status == JobStatus.RUNNING, (JobRow.heartbeat_at.is_(None)) | (JobRow.heartbeat_at < cutoff)
            )
            return list(s.scalars(q))

    @staticmethod
    def _row(s: Session, tenant: str | None, job_id: str) -> JobRow:
        row = s.get(JobRow, job_id) if JOB_ID.fullmatch(job_id) else None
        if row is None or (tenant is not None and row.tenant != tenant):
            raise NotFoundError(f"No such fine-tuning job: {job_id[:80]}", param="fine_tuning_job_id")
        return row

    def list(self, tenant: str, *, after: str | None = None, limit: int = 20) -> tuple[list[Job], bool]:
        """The tenant's jobs, newest first, after the job ``after``; and whether more follow."""
        newest_first = (JobRow.created_at.desc(), JobRow.id.desc())
        with self.db.session() as s:
            q = select(JobRow).where(JobRow.tenant == tenant).order_by(*newest_first).limit(limit + 1)
            if after is not None:
                cursor = s.get(JobRow, after) if JOB_ID.fullmatch(after) else None
                if cursor is None or cursor.tenant != tenant:
                    return [], False
                q = q.where(
                    (JobRow.created_at < cursor.created_at)
                    | ((JobRow.created_at == cursor.created_at) & (JobRow.id < cursor.id))
                )
            rows = list(s.scalars(q))
            return [Job.from_row(r) for r in rows[:limit]], len(rows) > limit
