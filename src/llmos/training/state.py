"""Where a training run stands, typed, and how it is written into a checkpoint: plain JSON
(``trainer_state.json``), never pickle, checked field by field when read back."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class EpochScore:
    """One epoch's validation result as the task's selection metric ranks it."""

    epoch: int
    value: float
    metrics: dict[str, Any] = field(default_factory=dict)
    """All of that epoch's metrics, so a resumed run still reports the best epoch's."""


@dataclass
class TrainingState:
    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    """Optimizer steps taken."""
    trained_tokens: int = 0
    """Input tokens of every batch trained on (each epoch counts again)."""
    best: EpochScore | None = None
    """The best validation epoch so far; None before the first validation (or without validation data)."""
    bad_epochs: int = 0
    """Validated epochs since ``best`` last improved (early stopping counts these)."""
    scores: list[EpochScore] = field(default_factory=list)
    """Every validated epoch, in order: keep-best falls back on the next best when the best one's
    checkpoint cannot be restored."""

    def score(self, epoch: int, metrics: dict[str, Any], metric: str, higher_is_better: bool) -> None:
        """Rank a validated epoch against the best so far: it becomes the best, or counts as a bad epoch."""
        value = float(metrics[metric])
        self.scores.append(EpochScore(epoch, value, dict(metrics)))
        better = self.best is None or (value > self.best.value if higher_is_better else value < self.best.value)
        if better:
            self.best, self.bad_epochs = EpochScore(epoch, value, dict(metrics)), 0
        else:
            self.bad_epochs += 1

    def ranked(self, higher_is_better: bool) -> list[EpochScore]:
        """The validated epochs, best first (of equal values, the earlier). A state read from an
        older checkpoint knows only ``best`` of the epochs before it."""
        known = self.scores if self.best is None or self.best in self.scores else [self.best, *self.scores]
        return sorted(known, key=lambda s: (-s.value if higher_is_better else s.value, s.epoch))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> TrainingState:
        """The state a checkpoint recorded; ``ValueError`` naming the field when it is malformed.
        Chat checkpoints written before the loops were one keep their best loss under
        ``best_valid_loss`` (with no epoch: only its value ranked later epochs)."""
        if not isinstance(data, dict):
            raise ValueError("checkpoint state must be a JSON object")
        best = data.get("best")
        if best is None and data.get("best_valid_loss") is not None:
            best = {"epoch": 0, "value": data["best_valid_loss"]}
        return cls(
            epoch=_count(data, "epoch"),
            step=_count(data, "step"),
            trained_tokens=_count(data, "trained_tokens"),
            best=None if best is None else _score(best),
            bad_epochs=_count(data, "bad_epochs"),
            scores=[_score(score) for score in _list(data, "scores")],
        )


def _count(data: dict[str, Any], name: str) -> int:
    value = data.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"checkpoint state: {name} must be a non-negative integer")
    return value


def _list(data: dict[str, Any], name: str) -> list[Any]:
    value = data.get(name, [])
    if not isinstance(value, list):
        raise ValueError(f"checkpoint state: {name} must be a list")
    return value


def _score(data: Any) -> EpochScore:
    if not isinstance(data, dict):
        raise ValueError("checkpoint state: best must be an object")
    value, metrics = data.get("value"), data.get("metrics", {})
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("checkpoint state: best.value must be a number")
    if not isinstance(metrics, dict):
        raise ValueError("checkpoint state: best.metrics must be an object")
    return EpochScore(epoch=_count(data, "epoch"), value=float(value), metrics=metrics)
