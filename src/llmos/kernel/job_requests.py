"""Checks a fine-tuning job request (model, files, method, suffix, seed, priority, metadata)
before anything is queued: every problem is a 400 naming its ``param``."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from llmos.config import Settings
from llmos.errors import InvalidRequestError, NotFoundError
from llmos.registry.adapters import ADAPTER_FORMATS
from llmos.registry.files import FileRecord, FileStore
from llmos.registry.metadata import check_metadata
from llmos.registry.service import ModelRecord, ModelRegistry
from llmos.training.adapters import SERVED_AS_ADAPTERS
from llmos.training.corpus import CORPUS_PURPOSE
from llmos.training.finetune_memory import WORKER_RUNTIME_BYTES, fine_tuning_estimate
from llmos.training.model_presets import MemoryEstimate, estimate_memory
from llmos.training.pretrain_spec import SECTION, PretrainSpec, is_pretrain, parse_pretrain
from llmos.training.spec import TrainingSpec, parse_spec

if TYPE_CHECKING:
    from llmos.cluster.view import NodeView

PRETRAIN_MEMORY_MB: int = Settings.model_fields["pretrain_memory_mb"].default
"""The budget a caller that names none checks pre-training jobs against: the setting's default."""
JOB_GPUS: float = Settings.model_fields["ray_job_gpus"].default
"""The GPUs of a job that does not say, where the caller names none: the setting's default."""
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

    base: ModelRecord | None
    """The model trained on; None for pre-training, which builds a new one."""
    training: FileRecord
    validation: FileRecord | None
    task: str
    spec: TrainingSpec
    suffix: str | None
    seed: int
    priority: int
    metadata: dict[str, str] | None
    pretrain: PretrainSpec | None = None
    memory_bytes: int | None = None
    """The job's worker's estimated peak memory (what a cluster reserves for it); None: not known."""
    memory_param: str = "model"
    """The request's field whose change shrinks ``memory_bytes`` most: what a refusal for size names."""

    @property
    def model(self) -> str:
        """What the job's ``model`` field says: the base's name, or the architecture pre-training builds."""
        return self.base.name if self.base is not None else self.pretrain.model if self.pretrain else ""


def check_job_request(
    registry: ModelRegistry,
    files: FileStore,
    tenant: str,
    body: dict[str, Any],
    *,
    pretrain_memory_mb: int = PRETRAIN_MEMORY_MB,
) -> JobRequest:
    if is_pretrain(body.get("method")):
        return check_pretrain_request(registry, files, tenant, body, memory_mb=pretrain_memory_mb)
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
    suffix, seed = check_suffix(body.get("suffix")), check_seed(body.get("seed"))
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
    if spec.pooling is not None and task != "sequence-classification":
        raise InvalidRequestError(
            "pooling applies to sequence-classification fine-tuning only",
            param=f"{spec.section}.pooling",
            code="unsupported_method",
        )
    if spec.packing and task != "chat":
        raise InvalidRequestError(
            "packing applies to chat fine-tuning only", param=f"{spec.section}.packing", code="unsupported_method"
        )
    if base.format in ADAPTER_FORMATS and spec.adapter in SERVED_AS_ADAPTERS:
        # Its result would be an adapter of an adapter, which the registry refuses once it has trained.
        raise InvalidRequestError(
            f"model {base.name} is an adapter, and a {spec.adapter} fine-tune of it would be an adapter of an "
            "adapter, which cannot be served; fine-tune its base model instead",
            param="model",
            code="unsupported_model",
        )
    shaped, parameters = _estimated_model(registry, base)
    memory = fine_tuning_estimate(
        registry.model_dir(shaped),
        parameters,
        spec,
        task,
        data_bytes=training.bytes + (validation.bytes if validation is not None else 0),
        labels=len(training.summary.get("labels") or ()),
    )
    return JobRequest(
        base=base,
        training=training,
        validation=validation,
        task=task,
        spec=spec,
        suffix=suffix,
        seed=seed,
        priority=check_priority(body.get("priority", 0)),
        metadata=check_metadata(body.get("metadata")),
        memory_bytes=memory.total + WORKER_RUNTIME_BYTES if memory is not None else None,
        memory_param=_fine_tuning_shrink(spec, memory) if memory is not None else "model",
    )


def with_gpus(request: JobRequest, server_gpus: float) -> JobRequest:
    """``request`` with its GPUs decided: its own, else ``server_gpus`` (the server's ``ray_job_gpus``).
    Decided once, when the job is created, so that what the job shows is what its worker is given
    and computes on wherever it runs (a worker on another node has that node's settings, not the server's)."""
    if request.spec.gpus is not None:
        return request
    return replace(request, spec=replace(request.spec, gpus=server_gpus))


def _estimated_model(registry: ModelRegistry, base: ModelRecord) -> tuple[ModelRecord, int | None]:
    """The model whose ``config.json`` gives a job's shapes, and the parameters the job loads: the
    base's own; for an adapter (whose folder has no ``config.json``), the model it runs on (its
    parent, else its lineage's root) and its parameters with the adapter's."""
    if base.format not in ADAPTER_FORMATS:
        return base, base.parameter_count
    for model_id in (base.parent_id, base.base_id):
        try:
            under = registry.get(model_id) if model_id else None
        except NotFoundError:
            continue  # deleted since the adapter was made
        if under is not None:
            counted = under.parameter_count
            return under, counted + (base.parameter_count or 0) if counted else None
    return base, base.parameter_count  # no config to read: the caller's fixed fallback


def _fine_tuning_shrink(spec: TrainingSpec, memory: MemoryEstimate) -> str:
    """The field that shrinks a fine-tuning job's largest share of memory: the data's, the
    activations' (the batch, or a single row's length), or the weights' and optimizer's (an adapter
    rather than a full fine-tune, else a smaller model)."""
    weights = memory.model + memory.checkpoint
    if memory.corpus >= max(weights, memory.activations):
        return "training_file"
    if memory.activations >= weights:
        return f"{spec.section}.{'hyperparameters.batch_size' if spec.batch_size > 1 else 'max_seq_length'}"
    return f"{spec.section}.adapter.type" if spec.adapter == "full" else "model"


def check_fits_cluster(request: JobRequest, nodes: Sequence[NodeView]) -> None:
    """400 for a job asking for more GPUs, or with more estimated memory, than any live node of the
    cluster has in all: none could ever start its worker, and it would wait in the queue for a larger
    node to join. A job without an estimate (it reserves ``ray_job_memory_mb``) is checked for its
    GPUs only; a cluster with no live node known lets every job through."""
    live = [n for n in nodes if n.alive]
    most_gpus = max((n.resources.get("GPU", 0.0) for n in live), default=None)
    gpus = request.spec.gpus or 0.0
    if most_gpus is not None and gpus > most_gpus:
        raise InvalidRequestError(
            f"this job asks for {gpus:g} GPUs and no live node of the cluster has more than {most_gpus:g}: "
            f"ask for at most {most_gpus:g} ({request.spec.section}.gpus; 0 trains on CPUs)",
            param=f"{request.spec.section}.gpus",
            code="exceeds_cluster_gpus",
        )
    largest = max((int(n.resources.get("memory", 0)) for n in live), default=None)
    if request.memory_bytes is None or largest is None or request.memory_bytes <= largest:
        return
    smaller = (
        "a smaller model, vocabulary, batch_size, max_seq_length or corpus"
        if request.pretrain is not None
        else "a smaller batch_size or max_seq_length, an adapter rather than a full fine-tune, a smaller model "
        "or less data"
    )
    raise InvalidRequestError(
        f"this job's worker would need about {request.memory_bytes >> 20} MiB (its memory estimate) and the "
        f"largest live node of the cluster has {largest >> 20} MiB in all: choose {smaller}",
        param=request.memory_param,
        code="exceeds_cluster_memory",
    )


def check_suffix(suffix: Any) -> str | None:
    if suffix is not None and (not isinstance(suffix, str) or not _SUFFIX.fullmatch(suffix)):
        raise InvalidRequestError("suffix must be 1-40 lowercase letters, digits or '-'", param="suffix")
    return suffix


def check_seed(seed: Any) -> int:
    """The job's seed (a random one when none is given)."""
    if seed is None:
        return secrets.randbelow(2**31)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise InvalidRequestError("seed must be an integer from 0 to 2147483647", param="seed")
    return seed


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or not -10 <= priority <= 10:
        raise InvalidRequestError("priority must be an integer from -10 to 10", param="priority")
    return priority


def _training_file(
    files: FileStore, tenant: str, file_id: Any, param: str, base_task: str, learns: dict[str, str]
) -> FileRecord:
    """The tenant's processed fine-tune file, in one of the formats of ``learns``."""
    record = _processed_file(files, tenant, file_id, param, "fine-tune")
    if record.summary.get("format") not in learns:
        raise InvalidRequestError(
            f"{param} {file_id} is a {record.summary.get('format')} file; fine-tuning a {base_task} model "
            f"needs {' or '.join(learns)} data",
            param=param,
            code="invalid_training_file",
        )
    return record


def _processed_file(files: FileStore, tenant: str, file_id: Any, param: str, purpose: str) -> FileRecord:
    """The tenant's file ``file_id`` of ``purpose``, valid at upload."""
    if not isinstance(file_id, str):
        raise InvalidRequestError(f"{param} must be a file id", param=param)
    try:
        record = files.get(tenant, file_id)
    except NotFoundError as exc:
        raise InvalidRequestError(
            f"invalid {param}: no such file {file_id[:80]}", param=param, code="invalid_file"
        ) from exc
    if record.purpose != purpose:
        raise InvalidRequestError(f"{param} {file_id} has purpose {record.purpose}, not {purpose}", param=param)
    if record.status != "processed":
        raise InvalidRequestError(
            f"{param} {file_id} is invalid: {record.status_details}", param=param, code="invalid_training_file"
        )
    return record


def check_pretrain_request(
    registry: ModelRegistry, files: FileStore, tenant: str, body: dict[str, Any], *, memory_mb: int
) -> JobRequest:
    """A pre-training job: its corpus files (purpose ``pretrain``), architecture and tokenizer, and a
    run whose estimated peak memory fits ``memory_mb`` (else 400 naming what to shrink)."""
    spec, pretrain = parse_pretrain(
        body["method"],
        body.get("hyperparameters"),
        model=body.get("model"),
        has_validation_file=bool(body.get("validation_file")),
    )
    training = _processed_file(files, tenant, body.get("training_file"), "training_file", CORPUS_PURPOSE)
    more = [
        _processed_file(files, tenant, f, f"{SECTION}.training_files[{i}]", CORPUS_PURPOSE)
        for i, f in enumerate(pretrain.training_files)
    ]
    validation_id = body.get("validation_file")
    validation = (
        _processed_file(files, tenant, validation_id, "validation_file", CORPUS_PURPOSE) if validation_id else None
    )
    vocab, source_id = pretrain.vocab_size or 0, None
    if pretrain.tokenizer == "model":
        source_id, vocab = _tokenizer_source(registry, tenant, str(pretrain.tokenizer_model))
    corpus = [training, *more, *([validation] if validation else [])]
    memory = estimate_memory(
        pretrain.dims,
        vocab,
        batch_size=spec.batch_size,
        context=spec.max_seq_length,
        corpus_bytes=sum(f.bytes for f in corpus),
    )
    param = (
        "training_file"
        if memory.corpus * 2 > memory.total
        else f"{SECTION}.tokenizer"
        if memory.vocabulary * 2 > memory.total
        else f"{SECTION}.architecture"
    )
    if memory.total > memory_mb * 1024 * 1024:
        raise InvalidRequestError(
            f"this run would need about {memory.total // 2**20} MiB (model and optimizer {memory.model // 2**20}, "
            f"activations {memory.activations // 2**20}, corpus {memory.corpus // 2**20}; the vocabulary's share "
            f"{memory.vocabulary // 2**20}) and pre-training may use {memory_mb} MiB (pretrain_memory_mb): "
            "choose a smaller model, vocabulary, batch_size, max_seq_length or corpus",
            param=param,
            code="exceeds_memory_budget",
        )
    return JobRequest(
        base=None,
        training=training,
        validation=validation,
        task="pretrain",
        spec=spec,
        suffix=check_suffix(body.get("suffix")),
        seed=check_seed(body.get("seed")),
        priority=check_priority(body.get("priority", 0)),
        metadata=check_metadata(body.get("metadata")),
        pretrain=replace(
            pretrain,
            tokenizer_model_id=source_id,
            corpus_sha256=tuple(f.sha256 for f in [training, *more]),
        ),
        memory_bytes=memory.total + WORKER_RUNTIME_BYTES,
        memory_param=param,
    )


def _tokenizer_source(registry: ModelRegistry, tenant: str, name: str) -> tuple[str, int]:
    """The id and vocabulary size of the causal model whose tokenizer a pre-training job reuses."""
    param = f"{SECTION}.tokenizer.model"
    try:
        source = registry.get(name, tenant=tenant)
    except NotFoundError as exc:
        raise InvalidRequestError(f"no such model {name[:80]}", param=param, code="model_not_found") from exc
    config = registry.model_dir(source) / "config.json"
    vocab = json.loads(config.read_text()).get("vocab_size") if config.is_file() else None
    if source.task not in ("chat", "completion") or not isinstance(vocab, int) or vocab < 1:
        raise InvalidRequestError(
            f"model {source.name} is a {source.task} model without a causal tokenizer to reuse", param=param
        )
    return source.id, vocab
