"""What every trainer takes and gives back: one run's inputs, the hooks it reports through, its
result, and the exception that stops it when its job is cancelled or paused."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llmos.training.pretrain_spec import PretrainSpec
from llmos.training.spec import TrainingSpec


class Stopped(Exception):
    """Raised inside a training loop when the job is cancelled or paused; ``reason`` says which
    (the control value the hooks reported)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class Hooks:
    metrics: Callable[[dict[str, Any]], None]
    message: Callable[[str], None]
    checkpoint: Callable[[int, int, dict[str, Any], Path], None]
    control: Callable[[], str | None]


class CheckpointSource(Protocol):
    """Where a run's complete checkpoints are found again: its own work directory
    (``checkpoints.LocalCheckpoints``), or for a job the artifact store, from any node."""

    def latest_epoch(self, before: int | None = None) -> int | None:
        """The newest epoch (earlier than ``before`` when given) with a complete checkpoint; None:
        none has one."""

    def fetch(self, epoch: int) -> Path:
        """A local directory holding the checkpoint of ``epoch`` (one ``latest_epoch`` counted)."""


@dataclass(frozen=True)
class TrainingRun:
    base_dir: Path
    train_path: Path
    valid_path: Path | None
    spec: TrainingSpec
    seed: int
    work_dir: Path
    """Checkpoints and the result are written here."""
    hooks: Hooks
    bf16: bool
    """Autocast to bfloat16 (CPUs with AMX / AVX-512 BF16, GPUs that compute in it: ``device.bf16_fast``)."""
    pretrain: PretrainInputs | None = None
    """What only pre-training takes (its ``base_dir`` is unused: it builds a new model)."""
    checkpoints: CheckpointSource | None = None
    """Where a resume finds the checkpoints; None: those in ``work_dir``."""
    device: str = "cpu"
    """Where the model trains: ``cpu`` or ``cuda`` (``device.training_device``); the trainers move
    each batch to the model's device."""


@dataclass(frozen=True)
class PretrainInputs:
    spec: PretrainSpec
    more_training_paths: tuple[Path, ...] = ()
    """The corpus files besides ``train_path``, in the job's order."""
    tokenizer_dir: Path | None = None
    """The registered model whose tokenizer is reused; None: a BPE is trained on the corpus."""


@dataclass(frozen=True)
class TrainingResult:
    model_dir: Path
    metrics: dict[str, Any]
    trained_tokens: int
