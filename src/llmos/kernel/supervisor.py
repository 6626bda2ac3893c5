"""The job supervisor: starts queued jobs' workers where its launcher finds room (child processes
of the server, or in Ray cluster mode on the cluster's nodes), watches their heartbeats and exits,
carries out cancel and pause, and settles jobs whose worker died (they resume from their last
complete checkpoint). State lives in the database and changes only through the job store, so a
restarted server picks up where the last one stopped, and several servers can share one database:
each settles only jobs whose worker has fallen silent (a worker dies with its server), never those
another live server runs."""

from __future__ import annotations

import logging
import subprocess
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from llmos.config import Settings
from llmos.errors import NotFoundError
from llmos.kernel.job_status import StopRequest
from llmos.kernel.job_workers import (
    NoRoom,
    Placement,
    Spawn,
    WorkerLauncher,
    WorkerProcess,
    default_launcher,
    spawn_worker,
)
from llmos.kernel.jobs import JobStore
from llmos.security.quotas import TrainingQuota

log = logging.getLogger(__name__)
STALE_AFTER = timedelta(seconds=30)
"""A worker silent this long is gone: its supervisor kills it, another settles its job."""
START_WAITS = 10
"""A worker whose Ray actor has not started it within this many ``stale_after`` never will."""


@dataclass
class _Worker:
    job_id: str
    attempt: int
    process: WorkerProcess
    placement: Placement
    started_at: datetime | None = None
    """When the supervisor first saw its process started: its silence counts from then at the earliest."""
    waiting_since: datetime | None = None
    """When the supervisor first saw it not started yet (a Ray actor still starting it)."""


class JobSupervisor:
    def __init__(
        self,
        jobs: JobStore,
        quota: TrainingQuota,
        settings: Settings,
        spawn: Spawn = spawn_worker,
        stale_after: timedelta = STALE_AFTER,
        launcher: WorkerLauncher | None = None,
    ) -> None:
        """``launcher`` places and starts workers (default: Ray's in cluster mode, else local
        processes made by ``spawn``)."""
        self.jobs = jobs
        self.quota = quota
        self.settings = settings
        self.stale_after = stale_after
        self.launcher = launcher or default_launcher(settings, spawn)
        self._workers: dict[str, _Worker] = {}
        self._waiting: dict[str, str] = {}
        """Queued job id -> why no node took it, as its events last said (said again only when it changes)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="job-supervisor", daemon=True)

    def start(self) -> None:
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
            self.jobs.settle_stopped(
                worker.job_id,
                "Server shutting down; the job will resume from its last checkpoint",
                attempt=worker.attempt,
            )
        self._workers.clear()

    def _run(self) -> None:
        self._tick_logged()  # at once: a restarted server resumes its jobs without waiting
        while not self._stop.wait(0.5):
            self._tick_logged()

    def _tick_logged(self) -> None:
        try:
            self.tick()
        except Exception:  # the supervisor must outlive any single bad tick
            log.exception("job supervisor tick failed")

    def tick(self) -> None:
        self._reap()
        self._enforce_control_and_heartbeats()
        self._settle_orphans()
        self._start_queued()

    # -- steps -----------------------------------------------------------------------------
    def _reap(self) -> None:
        for job_id, worker in list(self._workers.items()):
            code = worker.process.poll()
            if code is None:
                continue
            del self._workers[job_id]
            where = worker.placement.node_address
            self.jobs.settle_stopped(  # nothing to do if the worker finished the job itself
                job_id,
                f"Worker exited unexpectedly ({code}){f' on node {where}' if where else ''}; "
                "resuming from the last checkpoint",
                attempt=worker.attempt,
                exit_code=code,
                max_attempts=self.settings.job_max_attempts,
            )

    def _enforce_control_and_heartbeats(self) -> None:
        if not self._workers:
            return
        now = self.jobs.clock()
        for job_id, (control, beat) in self.jobs.watch(list(self._workers)).items():
            worker = self._workers[job_id]
            if control in (StopRequest.CANCEL, StopRequest.PAUSE):
                worker.process.terminate()  # a stop at the next step is fine too; reaped next tick
            elif beat is not None and self._silent(worker, beat, now):
                log.warning("job %s: no heartbeat for %s; killing its worker", job_id, now - beat)
                worker.process.kill()

    def _silent(self, worker: _Worker, beat: datetime, now: datetime) -> bool:
        """No heartbeat for ``stale_after`` since the later of its last beat and its process's start
        (a Ray actor may take a while to start the worker on a busy node; until then none can come).
        A worker not started after ``START_WAITS`` times ``stale_after`` (an actor that found no room
        on its node waits in Ray for ever) counts as silent; until then the supervisor beats for it,
        so that another server on the database does not settle the job as an orphan meanwhile."""
        if not _has_started(worker.process):
            if worker.waiting_since is None:
                worker.waiting_since = now
            if now - worker.waiting_since > START_WAITS * self.stale_after:
                return True
            self.jobs.heartbeat(worker.job_id, worker.attempt)
            return False
        if worker.started_at is None:
            worker.started_at = now
        return now - max(beat, worker.started_at) > self.stale_after

    def _settle_orphans(self) -> None:
        """Running jobs whose worker fell silent, and that no worker of ours runs: their server
        stopped (this one before a restart, or another on the same database)."""
        for job_id in self.jobs.silent(self.stale_after):
            if job_id not in self._workers:
                self.jobs.settle_stopped(
                    job_id, "Its worker stopped answering; the job resumes from its last checkpoint"
                )

    def _start_queued(self) -> None:
        free = self.settings.max_concurrent_jobs - len(self._workers)
        if free <= 0:
            return
        queued = self.jobs.queued()
        if not queued:
            return
        # Running jobs per tenant, and per key within it (None counts the tenant's total).
        per_tenant: dict[str, dict[str | None, int]] = {}
        for tenant, key_id in self.jobs.running_owners():
            _count(per_tenant.setdefault(tenant, {}), key_id)
        # Fair share: among equal priorities, the tenant with the fewest running jobs goes first.
        queued.sort(key=lambda j: (-j.priority, per_tenant.get(j.tenant, {}).get(None, 0), j.created_at))
        still_queued = {job.id for job in queued}
        self._waiting = {job_id: why for job_id, why in self._waiting.items() if job_id in still_queued}
        disabled: dict[str, bool] = {}
        for job in queued:
            if free <= 0:
                break
            if disabled.setdefault(job.tenant, self._tenant_disabled(job.tenant)):
                continue  # waits until the tenant is enabled again
            if not self.quota.job_slot_free(job.tenant, job.key_id, per_tenant.get(job.tenant, {})):
                continue
            if self.quota.cpu_error(job.tenant, job.key_id) is not None:
                continue  # waits in the queue until the training CPU window resets
            placement = self.launcher.place(job)
            if isinstance(placement, NoRoom):
                if self._waiting.get(job.id) != placement.reason:
                    self._waiting[job.id] = placement.reason
                    self.jobs.add_event(job.id, placement.reason, level="warn")
                if placement.later:
                    break  # no node has room now: the queue waits in its order, no attempt spent
                continue  # no node is large enough at all: the jobs behind it need not wait for it
            self._waiting.pop(job.id, None)
            attempt = self.jobs.claim(job.id)
            if attempt is None:
                continue  # another supervisor took it
            process = self.launcher.start(job.id, attempt, placement)
            self._workers[job.id] = _Worker(job.id, attempt, process, placement)
            self.jobs.attach_worker(job.id, attempt, process.pid, node=placement.node_address)
            _count(per_tenant.setdefault(job.tenant, {}), job.key_id)
            free -= 1

    def _tenant_disabled(self, tenant: str) -> bool:
        try:
            return self.quota.tenants.current(tenant).disabled
        except NotFoundError:
            return True  # a job of no tenant starts for no one

    @property
    def running(self) -> list[str]:
        return list(self._workers)

    @property
    def placements(self) -> dict[str, Placement]:
        """Where each job this supervisor runs has its worker."""
        return {job_id: worker.placement for job_id, worker in list(self._workers.items())}


def _has_started(process: WorkerProcess) -> bool:
    """Whether the worker's process exists yet: one a Ray actor is still starting on its node (a
    ``started`` of False) cannot have sent a heartbeat, so its silence does not count."""
    return bool(getattr(process, "started", True))


def _count(running: dict[str | None, int], key_id: str | None) -> None:
    running[None] = running.get(None, 0) + 1
    if key_id is not None:
        running[key_id] = running.get(key_id, 0) + 1
