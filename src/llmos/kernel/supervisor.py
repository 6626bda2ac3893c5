"""The job supervisor: starts queued jobs in worker processes, watches their heartbeats and
exits, carries out cancel and pause, and requeues jobs whose worker died (they resume from
their last complete checkpoint). State lives in the database, so a restarted server picks
up where the last one stopped."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import select, update

from llmos.config import Settings
from llmos.kernel.jobs import JobStore
from llmos.registry.tables import JobRow
from llmos.security.quotas import TrainingQuota

log = logging.getLogger(__name__)
STALE_AFTER = timedelta(seconds=30)


@dataclass
class _Worker:
    job_id: str
    process: subprocess.Popen[bytes]


def spawn_worker(job_id: str, settings: Settings) -> subprocess.Popen[bytes]:
    log_dir = settings.home / "jobs" / job_id
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LLMOS_HOME": str(settings.home)}
    if settings.database_url:
        env["LLMOS_DATABASE_URL"] = settings.database_url
    if settings.training_threads:
        env["OMP_NUM_THREADS"] = str(settings.training_threads)
    with (log_dir / "worker.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "llmos.training.worker", job_id], env=env, stdout=out, stderr=subprocess.STDOUT
        )


class JobSupervisor:
    def __init__(
        self,
        jobs: JobStore,
        quota: TrainingQuota,
        settings: Settings,
        spawn: Callable[[str, Settings], subprocess.Popen[bytes]] = spawn_worker,
    ) -> None:
        self.jobs = jobs
        self.db = jobs.db
        self.quota = quota
        self.settings = settings
        self._spawn = spawn
        self._workers: dict[str, _Worker] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-supervisor", daemon=True)

    def start(self) -> None:
        self._requeue_orphans()
        self._thread.start()

    def stop(self) -> None:
        """Stop supervising; running workers are stopped and their jobs queued to resume later."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for worker in list(self._workers.values()):
            worker.process.terminate()
        for worker in list(self._workers.values()):
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.process.kill()
            self._requeue(worker.job_id, "Server shutting down; the job will resume from its last checkpoint")
        self._workers.clear()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.tick()
            except Exception:  # the supervisor must outlive any single bad tick
                log.exception("job supervisor tick failed")

    def tick(self) -> None:
        self._reap()
        self._enforce_control_and_heartbeats()
        self._start_queued()

    # -- steps -----------------------------------------------------------------------------
    def _reap(self) -> None:
        for job_id, worker in list(self._workers.items()):
            code = worker.process.poll()
            if code is None:
                continue
            del self._workers[job_id]
            with self.db.session() as s:
                row = s.get(JobRow, job_id)
                if row is None or row.status != "running":
                    continue  # the worker finished the job itself (succeeded / failed)
                if row.control == "cancel":
                    row.status, row.control, row.finished_at = "cancelled", None, datetime.now(UTC)
                    message = "Job cancelled"
                elif row.control == "pause":
                    row.status, row.control = "paused", None
                    message = "Job paused; resume continues from the last checkpoint"
                elif row.attempts >= self.settings.job_max_attempts:
                    row.status, row.finished_at = "failed", datetime.now(UTC)
                    row.error = {
                        "code": "worker_crashed",
                        "param": None,
                        "message": f"the training worker died {row.attempts} times (last exit {code})",
                    }
                    message = "Job failed: the training worker kept dying"
                else:
                    row.status = "queued"
                    message = f"Worker exited unexpectedly ({code}); resuming from the last checkpoint"
                row.worker_pid = None
            self.jobs.add_event(job_id, message, level="warn" if "unexpectedly" in message else "info")

    def _enforce_control_and_heartbeats(self) -> None:
        now = datetime.now(UTC)
        with self.db.session() as s:
            rows = {
                r.id: (r.control, r.heartbeat_at)
                for r in s.scalars(select(JobRow).where(JobRow.id.in_(list(self._workers))))
            }
        for job_id, (control, beat) in rows.items():
            worker = self._workers[job_id]
            beat = beat.replace(tzinfo=UTC) if beat is not None and beat.tzinfo is None else beat
            if control in ("cancel", "pause"):
                worker.process.terminate()  # a stop at the next step is fine too; reaped next tick
            elif beat is not None and now - beat > STALE_AFTER:
                log.warning("job %s: no heartbeat for %s; killing its worker", job_id, now - beat)
                worker.process.kill()

    def _start_queued(self) -> None:
        free = self.settings.max_concurrent_jobs - len(self._workers)
        if free <= 0:
            return
        with self.db.session() as s:
            queued = list(
                s.scalars(
                    select(JobRow).where(JobRow.status == "queued").order_by(JobRow.priority.desc(), JobRow.created_at)
                )
            )
            running = list(s.execute(select(JobRow.tenant, JobRow.key_id).where(JobRow.status == "running")))
        # Running jobs per tenant, and per key within it (None counts the tenant's total).
        per_tenant: dict[str, dict[str | None, int]] = {}
        for tenant, key_id in running:
            _count(per_tenant.setdefault(tenant, {}), key_id)
        # Fair share: among equal priorities, the tenant with the fewest running jobs goes first.
        queued.sort(key=lambda r: (-r.priority, per_tenant.get(r.tenant, {}).get(None, 0), r.created_at))
        for row in queued:
            if free <= 0:
                break
            if not self.quota.job_slot_free(row.tenant, row.key_id, per_tenant.get(row.tenant, {})):
                continue
            if self.quota.cpu_error(row.tenant, row.key_id) is not None:
                continue  # waits in the queue until the training CPU window resets
            if not self._claim(row.id):
                continue
            process = self._spawn(row.id, self.settings)
            self._workers[row.id] = _Worker(row.id, process)
            with self.db.session() as s:
                claimed = s.get(JobRow, row.id)
                if claimed is not None:
                    claimed.worker_pid = process.pid
            self.jobs.add_event(row.id, f"Fine-tuning job started (attempt {row.attempts + 1})")
            _count(per_tenant.setdefault(row.tenant, {}), row.key_id)
            free -= 1

    def _claim(self, job_id: str) -> bool:
        """queued -> running, atomically: two supervisors can never both start a job."""
        with self.db.session() as s:
            result = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == "queued")
                .values(status="running", attempts=JobRow.attempts + 1, heartbeat_at=datetime.now(UTC), control=None)
            )
            return bool(getattr(result, "rowcount", 0))

    def _requeue(self, job_id: str, message: str) -> None:
        with self.db.session() as s:
            row = s.get(JobRow, job_id)
            if row is None or row.status != "running":
                return
            row.status, row.worker_pid = "queued", None
            if row.control == "cancel":
                row.status, row.finished_at = "cancelled", datetime.now(UTC)
            elif row.control == "pause":
                row.status = "paused"
            row.control = None
        self.jobs.add_event(job_id, message)

    def _requeue_orphans(self) -> None:
        """At start-up, jobs left 'running' by a previous server have no worker: resume them."""
        with self.db.session() as s:
            orphans = list(s.scalars(select(JobRow.id).where(JobRow.status == "running")))
        for job_id in orphans:
            self._requeue(job_id, "Server restarted; the job resumes from its last checkpoint")

    @property
    def running(self) -> list[str]:
        return list(self._workers)


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.home / "jobs" / job_id


def _count(running: dict[str | None, int], key_id: str | None) -> None:
    running[None] = running.get(None, 0) + 1
    if key_id is not None:
        running[key_id] = running.get(key_id, 0) + 1
