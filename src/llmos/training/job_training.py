"""A fine-tuning job's training, run by its worker process (``llmos.training.worker``) once that
process has started beating: the base model and data from the registry, the job's trainer, its
checkpoints and metrics reported to the job store, and the fine-tuned model registered at the end.
Everything heavy (torch, transformers, the trainers) is imported here, not by the worker's entry."""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from llmos.config import Settings
from llmos.errors import LLMOSError
from llmos.kernel.job_checkpoints import JobCheckpoints
from llmos.kernel.job_heartbeat import EXIT_STOPPED
from llmos.kernel.job_status import StopRequest
from llmos.kernel.job_workers import job_dir, job_gpus
from llmos.kernel.jobs import Job, checkpoint_name, fine_tuned_name
from llmos.platform import Platform
from llmos.registry.service import Lineage, ModelRecord
from llmos.training.checkpoints import SERVABLE, LocalCheckpoints
from llmos.training.classify import run_classification
from llmos.training.device import bf16_fast, training_device
from llmos.training.dpo import run_dpo
from llmos.training.metering import QUOTA_STOP, CpuMeter
from llmos.training.ner import run_token_classification
from llmos.training.pretrain import run_pretrain
from llmos.training.pretrain_spec import PretrainSpec
from llmos.training.run import Hooks, PretrainInputs, Stopped, TrainingRun
from llmos.training.sft import run_sft
from llmos.training.spec import TrainingSpec

if TYPE_CHECKING:
    from llmos.training.worker import Heartbeat

log = logging.getLogger("llmos.worker")
# A job's task (chosen from its base model and training file, see kernel.jobs.TRAINABLE) -> its trainer.
TRAINERS = {
    "chat": run_sft,
    "dpo": run_dpo,
    "sequence-classification": run_classification,
    "token-classification": run_token_classification,
    "pretrain": run_pretrain,
}


class StoredCheckpoints:
    """A job's checkpoints as the artifact store keeps them, each restored into the job's work
    directory on this node when the run asks for it (a resume here of a job another node began; on
    the node that wrote it, its local copy is used where it matches the record). A job with no
    checkpoint recorded in the store (one paused before checkpoints went there) resumes from its
    work directory's complete checkpoints, as it did then."""

    def __init__(self, checkpoints: JobCheckpoints, job_id: str, work_dir: Path) -> None:
        self.checkpoints = checkpoints
        self.job_id = job_id
        self.local = LocalCheckpoints(work_dir)

    def latest_epoch(self, before: int | None = None) -> int | None:
        if self.checkpoints.latest_epoch(self.job_id) is None:
            return self.local.latest_epoch(before)
        # A job the store keeps checkpoints for resumes from those only: a local one the store
        # lacks may be an unrecorded write of an attempt that lost the job.
        return self.checkpoints.latest_epoch(self.job_id, before)

    def fetch(self, epoch: int) -> Path:
        target = self.local.fetch(epoch)
        if not self.checkpoints.has_epoch(self.job_id, epoch) and target.is_dir():
            return target  # written before the store kept checkpoints (keep-best may ask for one)
        return self.checkpoints.restore(self.job_id, epoch, target)


def _hooks(platform: Platform, job: Job, heartbeat: Heartbeat, base: ModelRecord | None) -> Hooks:
    def checkpoint(step: int, epoch: int, data: dict[str, Any], path: Path) -> None:
        # The servable copy is registered as a model of its own below; a resume needs only the rest.
        stored = platform.jobs.stored_checkpoints.record(
            job.id, heartbeat.attempt, step=step, epoch=epoch, metrics=data, directory=path, leave_out=(SERVABLE,)
        )
        if not stored:
            raise Stopped(StopRequest.LOST)  # the job moved on to another attempt: nothing more of ours
        if (path / SERVABLE).is_dir():
            _register_checkpoint(platform, job, base, step, data, path / SERVABLE)

    return Hooks(
        metrics=lambda data: platform.jobs.record_metrics(job.id, data),
        message=lambda m: platform.jobs.add_event(job.id, m),
        checkpoint=checkpoint,
        control=lambda: heartbeat.control,
    )


def _lineage(job: Job, base: ModelRecord | None, **extra: Any) -> Lineage:
    """Where a job's model comes from: its base, or for pre-training, its corpus and recipe."""
    pretrain = job.method.get("pretrain")
    if pretrain is not None:
        extra = {"corpus_sha256": pretrain["corpus_sha256"], "pretrain": pretrain, **extra}
    return Lineage(
        owner=job.tenant,
        parent_id=base.id if base is not None else None,
        base_id=(base.base_id or base.id) if base is not None else None,
        extra={
            "job_id": job.id,
            "training_file": job.training_file,
            "training_file_sha256": job.training_sha256,
            "validation_file_sha256": job.validation_sha256,
            "hyperparameters": job.method.get("resolved"),
            "seed": job.seed,
            **extra,
        },
    )


def _register_checkpoint(
    platform: Platform, job: Job, base: ModelRecord | None, step: int, metrics: dict[str, Any], directory: Path
) -> None:
    """Make a checkpoint servable as ``<fine-tuned model>:ckpt-step-N``; training goes on if it cannot be."""
    name = checkpoint_name(fine_tuned_name(job, base.name if base is not None else job.model), step)
    try:
        platform.registry.pull(
            f"file:{directory}", name=name, lineage=_lineage(job, base, checkpoint_step=step, metrics=metrics)
        )
    except Exception as exc:  # a checkpoint model is a convenience; the checkpoint itself is saved
        log.exception("could not register checkpoint %s", name)
        platform.jobs.add_event(job.id, f"Checkpoint {step} is not servable: {exc}"[:1000], level="warn")
        return
    platform.jobs.add_event(job.id, f"Checkpoint model {name} is ready to serve", data={"model": name})


def _pretrain_inputs(platform: Platform, job: Job) -> PretrainInputs | None:
    """A pre-training job's corpus files besides its training file, and the model lending its tokenizer."""
    if "pretrain" not in job.method:
        return None
    spec = PretrainSpec.from_json(job.method["pretrain"])
    source = platform.registry.get(spec.tokenizer_model_id) if spec.tokenizer_model_id else None
    return PretrainInputs(
        spec=spec,
        more_training_paths=tuple(platform.registry.store.local_path(sha) for sha in spec.corpus_sha256[1:]),
        tokenizer_dir=platform.registry.model_dir(source) if source is not None else None,
    )


def _failure(exc: Exception) -> tuple[str, str]:
    """A failed job's error code and message: the platform's own code (e.g. ``disk_full``) where it has one."""
    if isinstance(exc, LLMOSError):
        return exc.code or "training_failed", exc.message
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "disk_full", f"no space left on device: {exc}"
    return "training_failed", f"{type(exc).__name__}: {exc}"


def train(settings: Settings, job_id: str, heartbeat: Heartbeat) -> int:
    """Train the claimed job ``job_id`` to its end (or its stop); the worker's exit code."""
    if settings.training_threads:
        torch.set_num_threads(settings.training_threads)
    platform = Platform.open(settings)
    job = platform.jobs.get(None, job_id)
    attempt = heartbeat.attempt  # the one its supervisor claimed; ``job.attempts`` may have moved on since
    heartbeat.meter = meter = CpuMeter(platform.jobs, platform.training_quota, job.id)
    work_dir = job_dir(settings, job_id)
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        base = platform.registry.get(job.base_model_id) if job.base_model_id else None  # pre-training: none
        hooks = _hooks(platform, job, heartbeat, base)
        device = training_device(job_gpus(job, settings), hooks.message)
        run = TrainingRun(
            base_dir=platform.registry.model_dir(base) if base is not None else work_dir,
            train_path=platform.registry.store.local_path(job.training_sha256),
            valid_path=platform.registry.store.local_path(job.validation_sha256) if job.validation_sha256 else None,
            spec=TrainingSpec(**job.method["resolved"]),
            seed=job.seed,
            work_dir=work_dir,
            hooks=hooks,
            bf16=bf16_fast(device),
            pretrain=_pretrain_inputs(platform, job),
            checkpoints=StoredCheckpoints(platform.jobs.stored_checkpoints, job_id, work_dir),
            device=device,
        )
        result = TRAINERS[job.method.get("task", "chat")](run)
        name = fine_tuned_name(job, base.name if base is not None else job.model)
        platform.registry.pull(
            f"file:{result.model_dir}", name=name, lineage=_lineage(job, base, metrics=result.metrics)
        )
    except Stopped as stopped:
        if stopped.reason == QUOTA_STOP:
            message = (
                f"{meter.over_quota or 'Training CPU quota exceeded.'} The job was stopped; its last "
                "checkpoint is kept, resume it once the quota resets."
            )
            platform.jobs.fail(job_id, attempt, QUOTA_STOP, message)
            return 1
        if stopped.reason != StopRequest.LOST:
            platform.jobs.add_event(job_id, f"Training stopped: {stopped.reason}")
        return EXIT_STOPPED
    except Exception as exc:
        log.exception("job %s failed", job_id)
        platform.jobs.fail(job_id, attempt, *_failure(exc))
        return 1
    finally:
        heartbeat.stop()
    platform.jobs.succeed(job_id, attempt, fine_tuned_model=name, trained_tokens=result.trained_tokens)
    platform.close()
    return 0
