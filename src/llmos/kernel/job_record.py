"""A fine-tuning job as the rest of the platform sees it (read-only), its OpenAI object, the
names of the models it registers, and its metrics file."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from llmos.kernel.job_status import JobStatus
from llmos.registry.tables import JobRow
from llmos.training.spec import HYPERPARAMETERS


def timestamp(value: datetime | None) -> int | None:
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
    status: JobStatus
    control: str | None
    error: dict[str, Any] | None
    fine_tuned_model: str | None
    attempts: int
    trained_tokens: int | None
    created_at: datetime
    finished_at: datetime | None
    priority: int = 0
    cpu_seconds: float = 0.0
    key_id: str | None = None
    metadata: dict[str, str] | None = None
    result_files: list[str] = field(default_factory=list)

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
            status=JobStatus(r.status),
            control=r.control,
            error=r.error,
            fine_tuned_model=r.fine_tuned_model,
            attempts=r.attempts,
            trained_tokens=r.trained_tokens,
            created_at=r.created_at,
            finished_at=r.finished_at,
            priority=r.priority,
            cpu_seconds=r.cpu_seconds or 0.0,
            key_id=r.key_id,
            metadata=dict(r.job_metadata) if r.job_metadata is not None else None,
            result_files=list(r.result_files or []),
        )

    def public(self) -> dict[str, Any]:
        """OpenAI's fine_tuning.job object (plus `training_file_sha256`, `priority`, `cpu_seconds`)."""
        spec = self.method.get("resolved", {})
        method = spec.get("method", "supervised")
        hyperparameters = {k: spec.get(k) for k in HYPERPARAMETERS[method]}
        return {
            "id": self.id,
            "object": "fine_tuning.job",
            "created_at": timestamp(self.created_at),
            "finished_at": timestamp(self.finished_at),
            "model": self.model,
            "fine_tuned_model": self.fine_tuned_model,
            "organization_id": self.tenant,
            "status": self.status.value,
            "training_file": self.training_file,
            "validation_file": self.validation_file,
            "result_files": self.result_files,
            "trained_tokens": self.trained_tokens,
            "error": self.error,
            "seed": self.seed,
            "estimated_finish": None,
            "integrations": [],
            "metadata": self.metadata,
            "user_provided_suffix": self.suffix,
            "hyperparameters": hyperparameters,
            "method": {
                "type": method,
                method: {
                    "hyperparameters": hyperparameters,
                    **{k: v for k, v in spec.items() if k not in (*HYPERPARAMETERS["dpo"], "method")},
                    **self.method.get("pretrain", {}),  # architecture, tokenizer, corpus of a pre-training job
                },
            },
            "training_file_sha256": self.training_sha256,
            "priority": self.priority,
            "cpu_seconds": round(self.cpu_seconds, 3),
        }


def fine_tuned_name(job: Job, base_name: str) -> str:
    """The model a job registers: ``ft:<base>:<tenant>:<suffix>:<id>``, as OpenAI names them; a
    pre-training job's ``pt:<architecture>:...``, since it has no base it was tuned from."""
    kind = "pt" if job.method.get("type") == "pretrain" else "ft"
    return f"{kind}:{base_name}:{job.tenant}:{job.suffix or 'model'}:{job.id.removeprefix('ftjob-')[:8]}"


def checkpoint_name(result_name: str, step: int) -> str:
    """A checkpoint's own servable model (chat jobs): ``<fine-tuned model>:ckpt-step-<N>``."""
    return f"{result_name}:ckpt-step-{step}"


def metrics_csv(reports: Iterable[dict[str, Any]]) -> bytes:
    """A job's result file, as OpenAI's ``step_metrics.csv``: one row per step, a column per
    number any metrics report gave (the training and the validation reports of a step merged)."""
    rows: dict[int, dict[str, Any]] = {}
    columns = ["step"]
    for report in reports:
        step = report.get("step")
        if not isinstance(step, int):
            continue
        row = rows.setdefault(step, {"step": step})
        for name, value in report.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                row[name] = value
                if name not in columns:
                    columns.append(name)
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows[step] for step in sorted(rows))
    return out.getvalue().encode()
