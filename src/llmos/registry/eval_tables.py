"""The Evals API's tables (evals, their runs, each run's graded items), on the registry's one base
in their own module, as the vector stores' are."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from llmos.registry.tables import Base, utcnow


class EvalRow(Base):
    """An eval: what its items look like and how each is graded."""

    __tablename__ = "evals"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(512))
    data_source_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    testing_criteria: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    eval_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class EvalRunRow(Base):
    """A run of an eval over a set of items, kept with the run so that a restart resumes it."""

    __tablename__ = "eval_runs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    eval_id: Mapped[str] = mapped_column(ForeignKey("evals.id", ondelete="CASCADE"), index=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[str | None] = mapped_column(String(32))
    """The API key that created it: its samples and model graders run with that key's access."""
    name: Mapped[str] = mapped_column(String(512))
    model: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16), index=True)
    data_source: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The data source as the request gave it (file contents left out), echoed by the API."""
    items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    generation: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    run_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    owner: Mapped[str | None] = mapped_column(String(128))
    """The server grading it; another takes it over once ``heartbeat_at`` is stale (``kernel.leases``)."""
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class EvalOutputItemRow(Base):
    """One graded item of a run, recorded once (unique per run and item)."""

    __tablename__ = "eval_output_items"
    __table_args__ = (UniqueConstraint("run_id", "item_index", name="uq_eval_output_items_run_item"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"), index=True)
    eval_id: Mapped[str] = mapped_column(String(64))
    item_index: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(8))
    """``pass``, ``fail`` or ``error``."""
    score: Mapped[float] = mapped_column(Float)
    """The share of the eval's testing criteria the item passed."""
    results: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    sample: Mapped[dict[str, Any]] = mapped_column(JSON)
    usage: Mapped[dict[str, Any]] = mapped_column(JSON)
    """Per model: invocations and tokens spent on this item."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
