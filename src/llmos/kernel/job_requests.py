"""Checks a fine-tuning job request (model, files, method, suffix, seed, priority, metadata)
before anything is queued: every problem is a 400 naming its ``param``."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from typing import Any

from llmos.errors import InvalidRequestError, NotFoundError
from llmos.registry.files import FileRecord, FileStore
from llmos.registry.metadata import check_metadata
from llmos.registry.service import ModelRecord, ModelRegistry
from llmos.training.spec import TrainingSpec, parse_spec

_SUFFIX = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
# Base model task -> {training-file format -> what a job on it learns}. Causal models learn chat;
# an encoder learns whatever head its training file's detected format calls for.
_CAUSAL = {"chat": "chat", "preference": "dpo"}
_ENCODER = {"classification": "sequence-classification", "token-classification": "token-classification"}
TRAINABLE = {
    "chat": _CAUSAL,
    "completion": _CAUSAL,
    "embedding": _ENCODER,
    "sequence-classification": _ENCODER,
    "token-classification": _ENCODER,
}


@dataclass(frozen=True)
class JobRequest:
    """A checked request: what the job store queues."""

    base: ModelRecord
    training: FileRecord
    validation: FileRecord | None
    task: str
    spec: TrainingSpec
    suffix: str | None
    seed: int
    priority: int
    metadata: dict[str, str] | None


def check_job_request(registry: ModelRegistry, files: FileStore, tenant: str, body: dict[str, Any]) -> JobRequest:
    base = registry.get(str(body.get("model", "")), tenant=tenant)
    learns = TRAINABLE.get(base.task)
    if learns is None:
        raise InvalidRequestError(
            f"model {base.name} is a {base.task} model; fine-tuning takes chat/completion models (chat data) "
            "or encoders (classification or token-classification data)",
            param="model",
            code="unsupported_model",
        )
    training = _training_file(files, tenant, body.get("training_file"), "training_file", base.task, learns)
    task = learns[training.summary["format"]]
    validation = (
        _training_file(
            files, tenant, body["validation_file"], "validation_file", base.task, {training.summary["format"]: task}
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
    if (task == "dpo") != (spec.method == "dpo"):
        raise InvalidRequestError(
            f"training_file {training.id} is a {training.summary['format']} file; method.type 'dpo' trains "
            "on preference lines and preference lines train with method.type 'dpo'",
            param="training_file" if spec.method == "dpo" else "method.type",
            code="invalid_training_file" if spec.method == "dpo" else "unsupported_method",
        )
    if spec.augmentation_probability and task != "sequence-classification":
        raise InvalidRequestError(
            "augmentation applies to classification fine-tuning only",
            param=f"{spec.section}.augmentation",
            code="unsupported_method",
        )
    if spec.packing and task != "chat":
        raise InvalidRequestError(
            "packing applies to chat fine-tuning only", param=f"{spec.section}.packing", code="unsupported_method"
        )
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not -10 <= priority <= 10:
        raise InvalidRequestError("priority must be an integer from -10 to 10", param="priority")
    return JobRequest(
        base=base,
        training=training,
        validation=validation,
        task=task,
        spec=spec,
        suffix=suffix,
        seed=seed,
        priority=priority,
        metadata=check_metadata(body.get("metadata")),
    )


def _training_file(
    files: FileStore, tenant: str, file_id: Any, param: str, base_task: str, learns: dict[str, str]
) -> FileRecord:
    """The tenant's processed fine-tune file, in one of the formats of ``learns``."""
    if not isinstance(file_id, str):
        raise InvalidRequestError(f"{param} must be a file id", param=param)
    try:
        record = files.get(tenant, file_id)
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
