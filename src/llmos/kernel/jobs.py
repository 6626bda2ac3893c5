"""The durable job store: the one owner of fine-tuning jobs' state.

Jobs, their events and checkpoints live in the database (the checkpoints' files in the artifact
store: ``stored_checkpoints``, ``kernel.job_checkpoints``). The API creates jobs and asks for
cancel, pause and resume; the supervisor claims queued jobs and settles those whose worker
stopped; the worker reports heartbeats, CPU time, events, metrics, checkpoints and its result.
All of them do it through this store's methods, and every status change goes through ``_move``:
legal per the table in ``job_status`` and atomic (a compare-and-set on the status it read), so
two processes (two servers on one database, a server and a worker) never both move one job.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from llmos.errors import ConflictError, InvalidRequestError, LLMOSError, NotFoundError
from llmos.kernel.job_checkpoints import JobCheckpoints
from llmos.kernel.job_heartbeat import beat
from llmos.kernel.job_queries import JobQueries
from llmos.kernel.job_record import Job, checkpoint_name, fine_tuned_name, metrics_csv
from llmos.kernel.job_requests import (
    JOB_GPUS,
    PRETRAIN_MEMORY_MB,
    TRAINABLE,
    check_fits_cluster,
    check_job_request,
    with_gpus,
)
from llmos.kernel.job_status import (
    RESUMABLE_ERRORS,
    TERMINAL,
    IllegalTransition,
    JobStatus,
    StopRequest,
    check_transition,
)
from llmos.registry.db import Database
from llmos.registry.files import FileStore
from llmos.registry.idempotency import find_earlier, insert_once
from llmos.registry.service import ModelRegistry
from llmos.registry.tables import JobEventRow, JobRow

if TYPE_CHECKING:
    from llmos.cluster.view import NodeView

__all__ = ["TRAINABLE", "Job", "JobStatus", "JobStore", "checkpoint_name", "fine_tuned_name"]

RESULTS_PURPOSE = "fine-tune-results"
_RACES = 5
"""Times a request re-reads a job whose status another process changed under it before giving up."""


def _raced(job_id: str) -> ConflictError:
    return ConflictError(
        f"job {job_id} changed state while this request ran; retry", param="fine_tuning_job_id", code="job_changed"
    )


class JobStore(JobQueries):
    def __init__(
        self,
        db: Database,
        files: FileStore,
        registry: ModelRegistry,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        *,
        pretrain_memory_mb: int = PRETRAIN_MEMORY_MB,
        job_gpus: float = JOB_GPUS,
        cluster_nodes: Callable[[], Sequence[NodeView]] | None = None,
    ) -> None:
        super().__init__(db, clock)
        self.files = files
        self.registry = registry
        self.pretrain_memory_mb = pretrain_memory_mb
        self.job_gpus = job_gpus
        """The GPUs of a job whose method does not say (``ray_job_gpus``), written into the job at
        creation: its worker, maybe on another node with other settings, reads them from the job."""
        self.cluster_nodes = cluster_nodes
        """The nodes of the Ray cluster this server has joined (None: not in cluster mode): a job
        larger than every live one is refused at creation rather than queued for ever."""
        self.stored_checkpoints = JobCheckpoints(db, registry.store, clock)
        """Checkpoints as the artifact store keeps them: recorded by workers, restored on resume."""

    # -- creation --------------------------------------------------------------------------
    def create(
        self, *, tenant: str, body: dict[str, Any], idempotency_key: str | None = None, key_id: str | None = None
    ) -> Job:
        """Validate a job request (files, model, method, metadata) and queue it; nothing is queued on error."""
        request_hash = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        if idempotency_key is not None:
            earlier = find_earlier(self.db, JobRow, tenant, idempotency_key, request_hash)
            if earlier is not None:
                return Job.from_row(earlier)
        request = with_gpus(
            check_job_request(self.registry, self.files, tenant, body, pretrain_memory_mb=self.pretrain_memory_mb),
            self.job_gpus,
        )
        if self.cluster_nodes is not None:
            check_fits_cluster(request, self.cluster_nodes())
        method: dict[str, Any] = {"type": request.spec.method, "task": request.task, "resolved": request.spec.as_dict()}
        if request.pretrain is not None:
            method["pretrain"] = request.pretrain.as_dict()
        if request.memory_bytes is not None:
            method["memory_bytes"] = request.memory_bytes  # what a cluster reserves for its worker
        row = JobRow(
            id=f"ftjob-{uuid.uuid4().hex[:24]}",
            tenant=tenant,
            key_id=key_id,
            model=request.model,
            base_model_id=request.base.id if request.base is not None else "",  # pre-training has none
            training_file=request.training.id,
            validation_file=request.validation.id if request.validation else None,
            training_sha256=request.training.sha256,
            validation_sha256=request.validation.sha256 if request.validation else None,
            suffix=request.suffix,
            seed=request.seed,
            method=method,
            status=JobStatus.QUEUED,  # files are validated before the job exists
            priority=request.priority,
            attempts=0,
            job_metadata=request.metadata,
            created_at=self.clock(),
            idempotency_key=idempotency_key,
            request_hash=request_hash,
        )
        events = [
            self._event(row.id, message)
            for message in (
                "Validating training file: " + request.training.id,
                "Files validated, moving job to queued state",
            )
        ]
        stored, _ = insert_once(self.db, row, events)
        return Job.from_row(stored)

    # -- what the API asks -----------------------------------------------------------------
    def cancel(self, tenant: str, job_id: str) -> Job:
        return self._ask_stop(tenant, job_id, StopRequest.CANCEL)

    def pause(self, tenant: str, job_id: str) -> Job:
        return self._ask_stop(tenant, job_id, StopRequest.PAUSE)

    def _ask_stop(self, tenant: str, job_id: str, request: StopRequest) -> Job:
        """A job that is not running stops at once; a running one is asked to, and its supervisor
        stops the worker and settles the job (``settle_stopped``)."""
        target = JobStatus.CANCELLED if request is StopRequest.CANCEL else JobStatus.PAUSED
        noun = "cancellation" if request is StopRequest.CANCEL else "pause"
        for _ in range(_RACES):  # a pass that loses a race reads the status another process set
            with self.db.session() as s:
                row = self._row(s, tenant, job_id)
                status = JobStatus(row.status)
                check_transition(job_id, status, target)
                if status is JobStatus.RUNNING:
                    asked = s.execute(
                        update(JobRow)
                        .where(JobRow.id == job_id, JobRow.status == status)
                        .values(control=request)
                        .execution_options(synchronize_session=False)
                    )
                    moved = bool(getattr(asked, "rowcount", 0))
                else:
                    moved = self._move(s, job_id, status, target)
                if moved:
                    s.add(self._event(job_id, f"Job {noun} requested"))
                    s.flush()
                    s.refresh(row)
                    return Job.from_row(row)
        raise _raced(job_id)

    def resume(self, tenant: str, job_id: str) -> Job:
        """A paused job, or one failed for a resumable cause, is queued to continue from its last checkpoint."""
        with self.db.session() as s:
            row = self._row(s, tenant, job_id)
            status = JobStatus(row.status)
            resumable = status is JobStatus.FAILED and (row.error or {}).get("code") in RESUMABLE_ERRORS
            if status is not JobStatus.PAUSED and not resumable:
                raise InvalidRequestError(
                    f"job {job_id} is {status.value}, not paused (or failed for a full disk or a spent quota)",
                    param="fine_tuning_job_id",
                    code="invalid_job_state",
                )
            if not self._move(s, job_id, status, JobStatus.QUEUED, error=None, finished_at=None):
                raise _raced(job_id)
            s.add(self._event(job_id, "Job resumed; queued to continue from its last checkpoint"))
            s.flush()
            s.refresh(row)
            return Job.from_row(row)

    # -- what a supervisor does ------------------------------------------------------------
    def claim(self, job_id: str) -> int | None:
        """queued -> running, atomically: of two supervisors, only one starts a job. The attempt
        it starts (None if another claimed it first): the worker and its supervisor name it in
        every later report, so a run that lost its job (see ``heartbeat``) changes nothing."""
        with self.db.session() as s:
            row = s.get(JobRow, job_id)
            if row is None or row.status != JobStatus.QUEUED:
                return None
            attempt = row.attempts + 1
            moved = self._move(
                s,
                job_id,
                JobStatus.QUEUED,
                JobStatus.RUNNING,
                attempts=attempt,
                heartbeat_at=self.clock(),
                control=None,
            )
            return attempt if moved else None

    def attach_worker(self, job_id: str, attempt: int, pid: int | None, *, node: str | None = None) -> None:
        """Record ``attempt``'s worker: its process id where known, and the cluster node it runs on."""
        where = f" on node {node}" if node else ""
        with self.db.session() as s:
            s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.attempts == attempt).values(worker_pid=pid))
            s.add(self._event(job_id, f"Fine-tuning job started (attempt {attempt}){where}"))

    def settle_stopped(
        self,
        job_id: str,
        reason: str,
        *,
        attempt: int | None = None,
        exit_code: int | None = None,
        max_attempts: int = 0,
    ) -> bool:
        """A running job whose worker is gone: cancelled or paused if that was asked; failed once a
        crashed worker (``exit_code``) has used ``max_attempts``; else queued again to resume from
        its last checkpoint. False if the job was not running (its worker had settled it), or ran
        another ``attempt`` than the one named."""
        with self.db.session() as s:
            row = s.get(JobRow, job_id)
            if row is None or row.status != JobStatus.RUNNING or attempt not in (None, row.attempts):
                return False
            extra: dict[str, Any] = {}
            level = "info"
            if row.control == StopRequest.CANCEL:
                target, message = JobStatus.CANCELLED, "Job cancelled"
            elif row.control == StopRequest.PAUSE:
                target, message = JobStatus.PAUSED, "Job paused; resume continues from the last checkpoint"
            elif exit_code is not None and row.attempts >= max_attempts:
                target, message = JobStatus.FAILED, "Job failed: the training worker kept dying"
                extra["error"] = {
                    "code": "worker_crashed",
                    "param": None,
                    "message": f"the training worker died {row.attempts} times (last exit {exit_code})",
                }
            else:
                target, message, level = JobStatus.QUEUED, reason, "warn" if exit_code is not None else "info"
            moved = self._move(
                s, job_id, JobStatus.RUNNING, target, attempt=row.attempts, worker_pid=None, control=None, **extra
            )
            if moved:
                s.add(self._event(job_id, message, level=level))
            return moved

    # -- what a worker reports -------------------------------------------------------------
    def heartbeat(self, job_id: str, attempt: int) -> str | None:
        """The worker of ``attempt`` is alive; what is asked of it (``job_heartbeat.beat``)."""
        return beat(self.db, job_id, attempt, self.clock())

    def charge_cpu(self, job_id: str, seconds: float) -> Job | None:
        """Add CPU time the job's worker used; the job (None if it is gone)."""
        with self.db.session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                return None
            row.cpu_seconds = (row.cpu_seconds or 0.0) + seconds
            return Job.from_row(row)

    def add_event(
        self,
        job_id: str,
        message: str,
        *,
        type: str = "message",
        level: str = "info",
        data: dict[str, Any] | None = None,
    ) -> None:
        with self.db.session() as s:
            s.add(self._event(job_id, message, type=type, level=level, data=data))

    def record_metrics(self, job_id: str, data: dict[str, Any]) -> None:
        """A training or validation report (``step`` and numbers), shown as a ``metrics`` event."""
        shown = ", ".join(f"{k}={v:.4f}" for k, v in data.items() if isinstance(v, float))
        self.add_event(job_id, f"Step {data.get('step')}: {shown}", type="metrics", data=data)

    def succeed(self, job_id: str, attempt: int, *, fine_tuned_model: str, trained_tokens: int) -> Job:
        """running -> succeeded, with the registered model and the metrics file as its result."""
        job = self.get(None, job_id)
        if job.status is not JobStatus.RUNNING or job.attempts != attempt:  # no result file for a lost run
            raise IllegalTransition(job_id, job.status, JobStatus.SUCCEEDED)
        results = self._metrics_file(job)
        with self.db.session() as s:
            values = {"fine_tuned_model": fine_tuned_model, "trained_tokens": trained_tokens, "result_files": results}
            if not self._move(s, job_id, JobStatus.RUNNING, JobStatus.SUCCEEDED, attempt=attempt, error=None, **values):
                raise IllegalTransition(job_id, self._status(s, job_id), JobStatus.SUCCEEDED)
            s.add(
                self._event(job_id, "The job has successfully completed", data={"fine_tuned_model": fine_tuned_model})
            )
        return self.get(None, job_id)

    def fail(self, job_id: str, attempt: int, code: str, message: str) -> None:
        """running -> failed with OpenAI's error object (``code`` names the cause, e.g. ``disk_full``)."""
        error = {"code": code, "message": message[:1000], "param": None}
        with self.db.session() as s:
            if not self._move(s, job_id, JobStatus.RUNNING, JobStatus.FAILED, attempt=attempt, error=error):
                raise IllegalTransition(job_id, self._status(s, job_id), JobStatus.FAILED)
            s.add(self._event(job_id, f"Job failed: {message}", level="error"))

    def _metrics_file(self, job: Job) -> list[str]:
        """Store the job's metrics as its tenant's ``step_metrics.csv`` file; its id, or none without metrics."""
        with self.db.session() as s:
            q = select(JobEventRow.data).where(JobEventRow.job_id == job.id, JobEventRow.type == "metrics")
            reports = [data for data in s.scalars(q.order_by(JobEventRow.id)) if data]
        if not reports:
            return []
        data = metrics_csv(reports)
        try:
            record, _ = self.files.create(
                tenant=job.tenant,
                purpose=RESULTS_PURPOSE,
                filename="step_metrics.csv",
                chunks=[data],
                max_bytes=len(data),
                generated=True,
            )
        except LLMOSError as exc:  # a spent storage quota: the job succeeded all the same
            self.add_event(job.id, f"The metrics file was not stored: {exc.message}", level="warn")
            return []
        return [record.id]

    # -- the one place a status changes ----------------------------------------------------
    def _move(
        self,
        s: Session,
        job_id: str,
        source: JobStatus,
        target: JobStatus,
        *,
        attempt: int | None = None,
        **values: Any,
    ) -> bool:
        """``source -> target`` if the table allows it (else ``IllegalTransition``) and the job is
        still ``source`` (and in ``attempt``, when named); else False: another process moved it
        first. A finished job keeps its time and no stop request."""
        check_transition(job_id, source, target)
        if target in TERMINAL:
            values.setdefault("finished_at", self.clock())
            values.setdefault("control", None)
        where = [JobRow.id == job_id, JobRow.status == source]
        if attempt is not None:
            where.append(JobRow.attempts == attempt)
        result = s.execute(
            update(JobRow).where(*where).values(status=target, **values).execution_options(synchronize_session=False)
        )
        return bool(getattr(result, "rowcount", 0))

    @staticmethod
    def _status(s: Session, job_id: str) -> JobStatus:
        row = s.get(JobRow, job_id)
        if row is None:
            raise NotFoundError(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
        return JobStatus(row.status)

    def _event(
        self,
        job_id: str,
        message: str,
        *,
        type: str = "message",
        level: str = "info",
        data: dict[str, Any] | None = None,
    ) -> JobEventRow:
        return JobEventRow(
            job_id=job_id, created_at=self.clock(), level=level, type=type, message=message[:2048], data=data
        )
