"""Relational schema of the registry (SQLAlchemy 2 ORM). Alembic migrations mirror it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_models_name_version"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256), index=True)
    version: Mapped[int] = mapped_column(Integer, default=1)
    family: Mapped[str | None] = mapped_column(String(64))
    architecture: Mapped[str | None] = mapped_column(String(128))
    task: Mapped[str] = mapped_column(String(32))
    format: Mapped[str] = mapped_column(String(32))
    parameter_count: Mapped[int | None] = mapped_column(BigInteger)
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    context_length: Mapped[int | None] = mapped_column(Integer)
    license: Mapped[str | None] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(1024))
    status: Mapped[str] = mapped_column(String(16), default="ready")
    owner: Mapped[str] = mapped_column(String(64), default="system")
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    base_id: Mapped[str | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"))
    extra: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    description: Mapped[str | None] = mapped_column(String(2000))
    tags: Mapped[list[str] | None] = mapped_column(JSON)

    artifacts: Mapped[list[ArtifactRow]] = relationship(
        back_populates="model", cascade="all, delete-orphan", lazy="selectin"
    )


class ArtifactRow(Base):
    """One file of a model: its name inside the model directory and the blob that holds it."""

    __tablename__ = "artifacts"

    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(512), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)

    model: Mapped[ModelRow] = relationship(back_populates="artifacts")


class BlobClaimRow(Base):
    """A blob that a write in progress is about to refer to (a model pull stores every file before
    it writes its rows): a reference until the write ends, or until the periodic collection finds it
    older than ``blob_grace_s`` (the write crashed)."""

    __tablename__ = "blob_claims"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    claim: Mapped[str] = mapped_column(String(32), index=True)
    """The write's own id: its rows go together when it ends."""
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKeyRow(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    tenant: Mapped[str] = mapped_column(String(64), default="default")
    key_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    limits: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class TenantRow(Base):
    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    limits: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditRow(Base):
    """Append-only: rows are inserted, never updated or deleted (the API offers no way to)."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    tenant: Mapped[str | None] = mapped_column(String(64), index=True)
    key_id: Mapped[str | None] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target: Mapped[str | None] = mapped_column(String(512))
    outcome: Mapped[str] = mapped_column(String(16))
    client: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class UsageRow(Base):
    """Tokens and requests per day, tenant, key and model (one row each, incremented)."""

    __tablename__ = "usage"

    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    model: Mapped[str] = mapped_column(String(256), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    """Training workers' CPU time (kind ``fine-tune``), the measure of the training CPU quota."""


class FileRow(Base):
    """An uploaded file (training data, batch input): its bytes live in the artifact store."""

    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key", name="uq_files_tenant_idempotency"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(String(255))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16))
    status_details: Mapped[str | None] = mapped_column(String(2048))
    summary: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))


class JobRow(Base):
    """A fine-tuning job: durable, so a restart resumes it from its last complete checkpoint."""

    __tablename__ = "fine_tuning_jobs"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str | None] = mapped_column(String(32))
    """The API key that created it: its training quotas apply besides the tenant's."""
    model: Mapped[str] = mapped_column(String(256))
    base_model_id: Mapped[str] = mapped_column(String(64))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    training_sha256: Mapped[str] = mapped_column(String(64))
    validation_sha256: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    method: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(24), index=True)
    control: Mapped[str | None] = mapped_column(String(16))  # cancel | pause, asked of the worker
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    """CPU time its workers used, all attempts together."""
    job_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    """The caller's key/value pairs, as OpenAI keeps them (``metadata`` is taken in SQLAlchemy classes)."""
    result_files: Mapped[list[str] | None] = mapped_column(JSON)
    """File ids of what the job produced (its metrics file)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))


class JobEventRow(Base):
    __tablename__ = "fine_tuning_job_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(String(2048))
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class JobCheckpointRow(Base):
    __tablename__ = "fine_tuning_job_checkpoints"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    path: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobCheckpointFileRow(Base):
    """A file of a job checkpoint, as a blob of the artifact store. A checkpoint's rows are written
    with it in one transaction, after every blob is stored, so a checkpoint either has all its files
    or is not there (``kernel.job_checkpoints``); blob collection counts them as references."""

    __tablename__ = "fine_tuning_job_checkpoint_files"

    checkpoint_id: Mapped[str] = mapped_column(
        ForeignKey("fine_tuning_job_checkpoints.id", ondelete="CASCADE"), primary_key=True
    )
    path: Mapped[str] = mapped_column(String(512), primary_key=True)
    """Relative to the checkpoint's directory."""
    sha256: Mapped[str] = mapped_column(String(64), index=True)


class BatchRow(Base):
    """A batch of requests (OpenAI's Batches API): durable, so a restarted server resumes it."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str | None] = mapped_column(String(32))
    """The API key that created it: its lines run with that key's scopes."""
    endpoint: Mapped[str] = mapped_column(String(64))
    input_file_id: Mapped[str] = mapped_column(String(64))
    input_sha256: Mapped[str] = mapped_column(String(64))
    completion_window: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), index=True)
    total: Mapped[int] = mapped_column(Integer)
    errors: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    output_file_id: Mapped[str | None] = mapped_column(String(64))
    error_file_id: Mapped[str | None] = mapped_column(String(64))
    batch_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    owner: Mapped[str | None] = mapped_column(String(128))
    """The server running it; another takes it over once ``heartbeat_at`` is stale."""
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    stamps: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    """When it entered each state (``in_progress_at``, ``completed_at``...), in Unix seconds."""


class BatchRequestRow(Base):
    """One answered line of a batch, recorded once: its primary key is the line, so a line answered
    again after a restart is not written twice."""

    __tablename__ = "batch_requests"

    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True)
    line: Mapped[int] = mapped_column(Integer, primary_key=True)
    custom_id: Mapped[str] = mapped_column(String(512))
    request_id: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)


class StoredCompletionRow(Base):
    """A chat completion stored at its caller's request (``store: true``): what was asked and answered."""

    __tablename__ = "stored_completions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str | None] = mapped_column(String(32))
    model: Mapped[str] = mapped_column(String(512), index=True)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    """The request's messages, as the model saw them."""
    request: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """The request's sampling fields that were set."""
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The chat.completion object answered (a streamed one as its chunks add up)."""
    completion_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class FeedbackRow(Base):
    """A judgement of one stored completion's choice: a rating, a corrected answer, tags, a comment."""

    __tablename__ = "completion_feedback"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    completion_id: Mapped[str] = mapped_column(ForeignKey("stored_completions.id", ondelete="CASCADE"), index=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str | None] = mapped_column(String(32))
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    rating: Mapped[str | None] = mapped_column(String(8))
    """``up``, ``down`` or ``1`` .. ``5``, as given."""
    score: Mapped[float | None] = mapped_column(Float)
    """The rating on one scale, 0 (worst) to 1 (best)."""
    correction: Mapped[str | None] = mapped_column(String(32768))
    tags: Mapped[list[str]] = mapped_column(JSON, default=list)
    comment: Mapped[str | None] = mapped_column(String(2048))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class AlertRuleRow(Base):
    """An alert rule written through the API (rules from files are read at start-up, not stored)."""

    __tablename__ = "alert_rules"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The rule as ``monitoring/alerts/rules.py`` reads it."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AlertEventRow(Base):
    """One change of an alert's state (pending, firing, resolved, inactive), appended, never updated."""

    __tablename__ = "alert_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rule: Mapped[str] = mapped_column(String(128), index=True)
    fingerprint: Mapped[str] = mapped_column(String(16), index=True)
    labels: Mapped[dict[str, str]] = mapped_column(JSON)
    previous: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    value: Mapped[float | None] = mapped_column(Float)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)


class ModelAliasRow(Base):
    """``name@alias``: a movable name for one model version (``production``, ``staging``, ...)."""

    __tablename__ = "model_aliases"

    name: Mapped[str] = mapped_column(String(256), primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    owner: Mapped[str] = mapped_column(String(64))
    """Whose line ``name`` is: the only tenant (besides admins) that may move its aliases."""
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SearchRow(Base):
    """A hyperparameter search: its checked request and its outcome. Its trials are ordinary
    fine-tuning jobs; its study (trials, parameters, intermediate values) is in Optuna's own
    tables in the same database, named by ``id`` (docs/adr/0024-hyperparameter-search.md)."""

    __tablename__ = "hyperparameter_searches"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key", name="uq_searches_tenant_idempotency"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str | None] = mapped_column(String(32))
    """The API key that created it: its trials are created in its name, under its quotas."""
    model: Mapped[str] = mapped_column(String(256))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The checked request: the trials' job body, search space, sampler, pruner, objective, budget."""
    status: Mapped[str] = mapped_column(String(24), index=True)
    owner: Mapped[str | None] = mapped_column(String(64))
    """The server whose search runner drives it; another takes it over once its heartbeat is stale."""
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    best: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    """The best trial: number, value, parameters, job."""
    fine_tuned_model: Mapped[str | None] = mapped_column(String(256))
    result_files: Mapped[list[str] | None] = mapped_column(JSON)
    search_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
