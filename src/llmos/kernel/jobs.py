"""The durable job queue: fine-tuning jobs, their events and checkpoints, in the database.

States are OpenAI's (validating_files, queued, running, succeeded, failed, cancelled) plus
paused. The API asks for cancel and pause through ``control``; the supervisor carries it out.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from llmos.errors import InvalidRequestError, NotFoundError
from llmos.registry.db import Database
from llmos.registry.files import FileRecord, FileStore
from llmos.registry.idempotency import find_earlier, insert_once
from llmos.registry.service import ModelRegistry
from llmos.registry.tables import JobCheckpointRow, JobEventRow, JobRow, ModelRow
from llmos.training.spec import parse_spec

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
RESUMABLE_ERRORS = frozenset({"disk_full", "quota_exceeded"})
"""A job failed for one of these can be resumed (from its last checkpoint) once the cause is gone."""
_JOB_ID = re.compile(r"^ftjob-[0-9a-f]{24}$")
_SUFFIX = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
# Base model task -> {training-file format -> what a job on it learns}. Causal models learn chat;
# an encoder learns whatever head its training file's detected format calls for.
_CAUSAL = {"chat": "chat"}
_ENCODER = {"classification": "sequence-classification", "token-classification": "token-classification"}
TRAINABLE = {
    "chat": _CAUSAL,
    "completion": _CAUSAL,
    "embedding": _ENCODER,
    "sequence-classification": _ENCODER,
    "token-classification": _ENCODER,
}


def _ts(value: datetime | None) -> int | None:
    if value is None:
        return None
    return int((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())


@dataclass(frozen=True)
class Job:
    id: str
    tenant: str
    model: str
    base_model_id: str
    training_file: str
    validation_file: str | None
    training_sha256: str
    validation_sha256: str | None
    suffix: str | None
    seed: int
    method: dict[str, Any]
    status: str
    control: str | None
    error: dict[str, Any] | None
    fine_tuned_model: str | None
    attempts: int
    trained_tokens: int | None
    created_at: datetime
    finished_at: datetime | None
    priority: int = 0
    cpu_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, r: JobRow) -> Job:
        return cls(
            id=r.id,
            tenant=r.tenant,
            model=r.model,
            base_model_id=r.base_model_id,
            training_file=r.training_file,
            validation_file=r.validation_file,
            training_sha256=r.training_sha256,
            validation_sha256=r.validation_sha256,
            suffix=r.suffix,
            seed=r.seed,
            method=dict(r.method or {}),
            status=r.status,
            control=r.control,
            error=r.error,
            fine_tuned_model=r.fine_tuned_model,
            attempts=r.attempts,
            trained_tokens=r.trained_tokens,
            created_at=r.created_at,
            finished_at=r.finished_at,
            priority=r.priority,
            cpu_seconds=r.cpu_seconds or 0.0,
        )

    def public(self) -> dict[str, Any]:
        """OpenAI's fine_tuning.job object (plus `training_file_sha256` and `priority`)."""
        spec = self.method.get("resolved", {})
        return {
            "id": self.id,
            "object": "fine_tuning.job",
            "created_at": _ts(self.created_at),
            "finished_at": _ts(self.finished_at),
            "model": self.model,
            "fine_tuned_model": self.fine_tuned_model,
            "organization_id": self.tenant,
            "status": self.status,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "result_files": [],
            "trained_tokens": self.trained_tokens,
            "error": self.error,
            "seed": self.seed,
            "estimated_finish": None,
            "integrations": [],
            "user_provided_suffix": self.suffix,
            "hyperparameters": {k: spec.get(k) for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
            "method": {
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {k: spec.get(k) for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
                    **{
                        k: v for k, v in spec.items() if k not in ("n_epochs", "batch_size", "learning_rate_multiplier")
                    },
                },
            },
            "training_file_sha256": self.training_sha256,
            "priority": self.priority,
            "cpu_seconds": round(self.cpu_seconds, 3),
        }


def fine_tuned_name(job: Job, base_name: str) -> str:
    """The model a job registers: ``ft:<base>:<tenant>:<suffix>:<id>``, as OpenAI names them."""
    return f"ft:{base_name}:{job.tenant}:{job.suffix or 'model'}:{job.id.removeprefix('ftjob-')[:8]}"


def checkpoint_name(result_name: str, step: int) -> str:
    """A checkpoint's own servable model (chat jobs): ``<fine-tuned model>:ckpt-step-<N>``."""
    return f"{result_name}:ckpt-step-{step}"


class JobStore:
    def __init__(self, db: Database, files: FileStore, registry: ModelRegistry) -> None:
        self.db = db
        self.files = files
        self.registry = registry

    # -- creation --------------------------------------------------------------------------
    def create(
        self, *, tenant: str, body: dict[str, Any], idempotency_key: str | None = None, key_id: str | None = None
    ) -> Job:
        """Validate a job request (files, model, method) and queue it; nothing is queued on error."""
        request_hash = hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()
        if idempotency_key is not None:
            earlier = self._by_key(tenant, idempotency_key, request_hash)
            if earlier is not None:
                return earlier
        base = self.registry.get(str(body.get("model", "")), tenant=tenant)
        learns = TRAINABLE.get(base.task)
        if learns is None:
            raise InvalidRequestError(
                f"model {base.name} is a {base.task} model; fine-tuning takes chat/completion models (chat data) "
                "or encoders (classification or token-classification data)",
                param="model",
                code="unsupported_model",
            )
        training = self._training_file(tenant, body.get("training_file"), "training_file", base.task, learns)
        task = learns[training.summary["format"]]
        validation = (
            self._training_file(
                tenant, body["validation_file"], "validation_file", base.task, {training.summary["format"]: task}
            )
            if body.get("validation_file")
            else None
        )
        suffix = body.get("suffix")
        if suffix is not None and (not isinstance(suffix, str) or not _SUFFIX.fullmatch(suffix)):
            raise InvalidRequestError("suffix must be 1-40 lowercase letters, digits or '-'", param="suffix")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**31)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
            raise InvalidRequestError("seed must be an integer from 0 to 2147483647", param="seed")
        spec = parse_spec(
            body.get("method"), body.get("hyperparameters"), training_records=int(training.summary.get("records", 0))
        )
        if spec.augmentation_probability and task != "sequence-classification":
            raise InvalidRequestError(
                "augmentation applies to classification fine-tuning only",
                param="method.supervised.augmentation",
                code="unsupported_method",
            )
        if spec.packing and task != "chat":
            raise InvalidRequestError(
                "packing applies to chat fine-tuning only", param="method.supervised.packing", code="unsupported_method"
            )
        priority = body.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int) or not -10 <= priority <= 10:
            raise InvalidRequestError("priority must be an integer from -10 to 10", param="priority")
        row = JobRow(
            id=f"ftjob-{uuid.uuid4().hex[:24]}",
            tenant=tenant,
            key_id=key_id,
            model=base.name,
            base_model_id=base.id,
            training_file=training.id,
            validation_file=validation.id if validation else None,
            training_sha256=training.sha256,
            validation_sha256=validation.sha256 if validation else None,
            suffix=suffix,
            seed=seed,
            method={"type": "supervised", "task": task, "resolved": spec.as_dict()},
            status="queued",
            priority=priority,
            attempts=0,
            created_at=datetime.now(UTC),
            idempotency_key=idempotency_key,
            request_hash=request_hash,
        )
        events = [
            JobEventRow(job_id=row.id, created_at=datetime.now(UTC), level="info", type="message", message=message)
            for message in ("Validating training file: " + training.id, "Files validated, moving job to queued state")
        ]
        stored, _ = insert_once(self.db, row, events)
        return Job.from_row(stored)

    def _training_file(
        self, tenant: str, file_id: Any, param: str, base_task: str, learns: dict[str, str]
    ) -> FileRecord:
        """The tenant's processed fine-tune file, in one of the formats of ``learns``."""
        if not isinstance(file_id, str):
            raise InvalidRequestError(f"{param} must be a file id", param=param)
        try:
            record = self.files.get(tenant, file_id)
        except NotFoundError as exc:
            raise InvalidRequestError(
                f"invalid {param}: no such file {file_id[:80]}", param=param, code="invalid_file"
            ) from exc
        if record.purpose != "fine-tune":
            raise InvalidRequestError(f"{param} {file_id} has purpose {record.purpose}, not fine-tune", param=param)
        if record.status != "processed":
            raise InvalidRequestError(
                f"{param} {file_id} is invalid: {record.status_details}", param=param, code="invalid_training_file"
            )
        if record.summary.get("format") not in learns:
            raise InvalidRequestError(
                f"{param} {file_id} is a {record.summary.get('format')} file; fine-tuning a {base_task} model "
                f"needs {' or '.join(learns)} data",
                param=param,
                code="invalid_training_file",
            )
        return record

    def _by_key(self, tenant: str, key: str, request_hash: str) -> Job | None:
        row = find_earlier(self.db, JobRow, tenant, key, request_hash)
        return Job.from_row(row) if row is not None else None

    # -- queries ---------------------------------------------------------------------------
    def get(self, tenant: str | None, job_id: str) -> Job:
        if not _JOB_ID.fullmatch(job_id):
            raise NotFoundError(f"No such fine-tuning job: {job_id[:80]}", param="fine_tuning_job_id")
        with self.db.session() as s:
            row = s.get(JobRow, job_id)
            if row is None or (tenant is not None and row.tenant != tenant):
                raise NotFoundError(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
            return Job.from_row(row)

    def events(self, tenant: str, job_id: str, *, after: int | None = None, limit: int = 20) -> list[dict[str, Any]]:
        self.get(tenant, job_id)
        with self.db.session() as s:
            q = select(JobEventRow).where(JobEventRow.job_id == job_id).order_by(JobEventRow.id.desc()).limit(limit)
            if after is not None:
                q = q.where(JobEventRow.id < after)
            return [
                {
                    "id": f"ftevent-{e.id}",
                    "object": "fine_tuning.job.event",
                    "created_at": _ts(e.created_at),
                    "level": e.level,
                    "message": e.message,
                    "type": e.type,
                    "data": e.data,
                }
                for e in s.scalars(q)
            ]

    def checkpoints(self, tenant: str, job_id: str) -> list[dict[str, Any]]:
        job = self.get(tenant, job_id)
        with self.db.session() as s:
            base = s.get(ModelRow, job.base_model_id)
            result_name = fine_tuned_name(job, base.name if base is not None else job.model)
            rows = s.scalars(
                select(JobCheckpointRow).where(JobCheckpointRow.job_id == job_id).order_by(JobCheckpointRow.step.desc())
            )
            return [
                {
                    "id": c.id,
                    "object": "fine_tuning.job.checkpoint",
                    "created_at": _ts(c.created_at),
                    "fine_tuning_job_id": job_id,
                    "step_number": c.step,
                    "metrics": c.metrics,
                    "fine_tuned_model_checkpoint": checkpoint_name(result_name, c.step),
                }
                for c in rows
            ]

    # -- control ---------------------------------------------------------------------------
    def cancel(self, tenant: str, job_id: str) -> Job:
        return self._control(tenant, job_id, "cancel")

    def pause(self, tenant: str, job_id: str) -> Job:
        return self._control(tenant, job_id, "pause")

    def resume(self, tenant: str, job_id: str) -> Job:
        with self.db.session() as s:
            row = self._row(s, tenant, job_id)
            resumable = row.status == "failed" and (row.error or {}).get("code") in RESUMABLE_ERRORS
            if row.status != "paused" and not resumable:
                raise InvalidRequestError(
                    f"job {job_id} is {row.status}, not paused (or failed for a full disk or a spent quota)",
                    param="fine_tuning_job_id",
                )
            row.status, row.control, row.error, row.finished_at = "queued", None, None, None
            s.add(
                JobEventRow(
                    job_id=job_id,
                    created_at=datetime.now(UTC),
                    level="info",
                    type="message",
                    message="Job resumed; queued to continue from its last checkpoint",
                )
            )
            return Job.from_row(row)

    def _control(self, tenant: str, job_id: str, action: str) -> Job:
        with self.db.session() as s:
            row = self._row(s, tenant, job_id)
            if row.status in TERMINAL or (action == "pause" and row.status == "paused"):
                raise InvalidRequestError(f"job {job_id} is already {row.status}", param="fine_tuning_job_id")
            if row.status == "running":
                row.control = action  # the supervisor stops the worker and sets the final state
            else:
                row.status = "cancelled" if action == "cancel" else "paused"
                if action == "cancel":
                    row.finished_at = datetime.now(UTC)
            s.add(
                JobEventRow(
                    job_id=job_id,
                    created_at=datetime.now(UTC),
                    level="info",
                    type="message",
                    message=f"Job {'cancellation' if action == 'cancel' else 'pause'} requested",
                )
            )
            return Job.from_row(row)

    @staticmethod
    def _row(s: Any, tenant: str, job_id: str) -> JobRow:
        row = s.get(JobRow, job_id) if _JOB_ID.fullmatch(job_id) else None
        if row is None or row.tenant != tenant:
            raise NotFoundError(f"No such fine-tuning job: {job_id[:80]}", param="fine_tuning_job_id")
        return row

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
            s.add(
                JobEventRow(
                    job_id=job_id,
                    created_at=datetime.now(UTC),
                    level=level,
                    type=type,
                    message=message[:2048],
                    data=data,
                )
            )

    def list(self, tenant: str, *, after: str | None = None, limit: int = 20) -> tuple[list[Job], bool]:
        with self.db.session() as s:
            rows = list(
                s.scalars(
                    select(JobRow).where(JobRow.tenant == tenant).order_by(JobRow.created_at.desc(), JobRow.id.desc())
                )
            )
        if after is not None:
            ids = [r.id for r in rows]
            rows = rows[ids.index(after) + 1 :] if after in ids else []
        return [Job.from_row(r) for r in rows[:limit]], len(rows) > limit
