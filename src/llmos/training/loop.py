"""The one training loop every task runs: resume from the last complete checkpoint, epochs of
shuffled batches, gradient accumulation, metrics windows, validation, an atomic checkpoint each
epoch, early stopping, and the result.

A task (chat SFT, sequence or token classification; pre-training and DPO plug in the same way)
supplies only what differs, as a ``TrainingTask``: its model, examples and batches, the loss of
one batch, its validation metrics and how they rank epochs, and how its model is saved. The
loop knows nothing of chat, encoders or tokenizers.
"""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from llmos.training.adapters import regularization
from llmos.training.adversarial import FGM
from llmos.training.checkpoints import (
    SERVABLE,
    UNRESTORABLE,
    LocalCheckpoints,
    load_weights,
    resume_latest,
    save_epoch,
)
from llmos.training.optim import Accumulation, Optimization
from llmos.training.run import CheckpointSource, Stopped, TrainingResult, TrainingRun
from llmos.training.state import EpochScore, TrainingState

E = TypeVar("E")
"""One training example of a task (a tokenised conversation, a labelled text...)."""
GROUP_WINDOW_BATCHES = 32
"""With ``group_by_length``, examples are sorted by length within windows of this many batches."""


@dataclass(frozen=True)
class StepOutput:
    """One batch: its mean loss (to backpropagate), how many predictions were right out of how
    many were counted (tokens, examples or labelled words), and how many input tokens it had."""

    loss: torch.Tensor
    correct: int
    counted: int
    tokens: int


@dataclass(frozen=True)
class Selection:
    """How validation ranks epochs: by ``metric`` (a key ``evaluate`` returns), higher or lower
    being better. ``keep_best``: the result is the best epoch's weights, not the last's."""

    metric: str
    higher_is_better: bool
    keep_best: bool


class TrainingTask(ABC, Generic[E]):
    """What one kind of training supplies to the loop."""

    model: torch.nn.Module
    """Ready to train (wrapped by its PEFT method); its trainable parameters are what the
    optimizer steps and what checkpoints hold."""
    train: Sequence[E]
    description: str
    """What is trained, for the first message, e.g. "sequence classification on 100 examples"."""
    selection: Selection
    accuracy_name: str = "train_accuracy"
    """The metrics events' name for the share of right predictions."""
    weight_decay: float = 0.0
    length: Callable[[E], int] | None = None
    """An example's length, for ``group_by_length`` batching; None: the task does not group."""

    def epoch_batches(self, rng: random.Random, size: int, by_length: bool) -> list[list[E]]:
        """One epoch's batches in training order, drawn with ``rng`` (seeded by the epoch, so a
        resumed run draws the same): ``train`` shuffled, grouped by ``length`` with ``by_length``.
        A task with another notion of batches overrides this, keeping about ``len(train) / size``
        of them (the schedule is built for ``TrainingSpec.total_steps(len(train))``)."""
        return shuffled_batches(self.train, size, rng, self.length if by_length else None)

    @abstractmethod
    def step(self, batch: list[E]) -> StepOutput:
        """The forward pass and loss of one batch (the loop backpropagates)."""

    @abstractmethod
    def evaluate(self) -> dict[str, Any] | None:
        """Validation metrics (``valid_*`` keys; scalars go to the metrics event, all of them to the
        checkpoint), or None without validation data."""

    @abstractmethod
    def save_checkpoint_model(self, directory: Path) -> None:
        """Write what the engine serves of the model as it is now (the checkpoint's servable copy),
        leaving the model in training untouched; nothing where the method allows none mid-run."""

    @abstractmethod
    def save_result(self, directory: Path) -> None:
        """Write the final model as the engine serves it."""

    def checkpoint_files(self) -> dict[str, Path]:
        """Files each checkpoint carries besides the training state (relative path -> the file),
        which a resume needs with the weights they belong to, on whichever node it runs; none here."""
        return {}


def shuffled_batches(
    examples: Sequence[E], size: int, rng: random.Random, length: Callable[[E], int] | None = None
) -> list[list[E]]:
    """Shuffled batches. With ``length``, each window of shuffled examples is sorted by length
    before it is cut into batches, and the batches are shuffled again, so a batch pads little
    while the order stays random from batch to batch (transformers' ``group_by_length``)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    if length is not None:
        window = size * GROUP_WINDOW_BATCHES
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: length(examples[i]))
        ]
    batches = [[examples[i] for i in order[k : k + size]] for k in range(0, len(order), size)]
    if length is not None:
        rng.shuffle(batches)
    return batches


def fit(task: TrainingTask[E], run: TrainingRun) -> TrainingResult:
    """Train ``task.model`` on ``task.train`` for the run's epochs, resuming from the newest
    complete checkpoint (``run.checkpoints``, by default those in ``run.work_dir``); write each epoch's
    checkpoint and the result (``result``) in ``run.work_dir``."""
    spec, hooks, model = run.spec, run.hooks, task.model
    total_steps = spec.total_steps(len(task.train))
    weight_decay = task.weight_decay if spec.weight_decay is None else spec.weight_decay
    opt = Optimization(model, spec, total_steps, weight_decay=weight_decay)
    fgm = FGM(model, spec.fgm_epsilon) if spec.fgm_epsilon else None
    saved = resume_latest(checkpoint_source(run), model, opt.optimizer, opt.scheduler, hooks.message)
    state = TrainingState() if saved is None else TrainingState.from_json(saved)
    hooks.message(
        f"Training {spec.adapter} {task.description}, {spec.n_epochs} epochs ({total_steps} steps, "
        f"batch {spec.batch_size})"
    )
    model.train()
    log_every = max(1, total_steps // spec.n_epochs // 10)
    metrics: dict[str, Any] = {}
    for epoch in range(state.epoch, spec.n_epochs):
        # Data order and dropout masks depend on the seed and the epoch only, so a run resumed from
        # a checkpoint ends with the very weights of one that was never stopped.
        torch.manual_seed(run.seed * 1000 + epoch)
        rng = random.Random(run.seed * 1000 + epoch)  # noqa: S311 -- data order, not secrets; the same on resume
        batches = task.epoch_batches(rng, spec.batch_size, spec.group_by_length)
        accumulation = Accumulation(len(batches), spec.gradient_accumulation_steps)
        window = _Window(task.accuracy_name)
        for b, batch in enumerate(batches):
            reason = hooks.control()
            if reason:
                raise Stopped(reason)
            out = task.step(batch)
            penalty = regularization(model)
            scale = accumulation.scale(b)
            ((out.loss if penalty is None else out.loss + penalty) / scale).backward()
            if fgm is not None:
                fgm.attack(partial(_scaled_loss, task, batch, scale))
            window.add(out)
            state.trained_tokens += out.tokens
            if not accumulation.steps_after(b):
                continue
            state.step += 1
            opt.step(state.step)
            if state.step % log_every == 0:
                metrics = {
                    "step": state.step,
                    **window.flush(),
                    "learning_rate": opt.learning_rate,
                    "epoch": epoch + 1,
                    "total_steps": total_steps,
                }
                hooks.metrics(metrics)
        state.epoch = epoch + 1
        metrics = _end_of_epoch(task, state, metrics, hooks.metrics)
        directory = save_epoch(
            run.work_dir,
            state.epoch,
            model=model,
            optimizer=opt.optimizer,
            scheduler=opt.scheduler,
            state=state.to_json(),
            files=task.checkpoint_files(),
        )
        task.save_checkpoint_model(directory / SERVABLE)  # served as <model>:ckpt-step-N
        hooks.checkpoint(state.step, state.epoch, metrics, directory)
        if spec.early_stopping_patience is not None and state.bad_epochs >= spec.early_stopping_patience:
            hooks.message(f"Early stopping after epoch {state.epoch}: {task.selection.metric} stopped improving")
            break
    metrics = _keep_best(task, state, run, metrics)
    out_dir = run.work_dir / "result"
    task.save_result(out_dir)
    return TrainingResult(model_dir=out_dir, metrics=metrics, trained_tokens=state.trained_tokens)


def _end_of_epoch(
    task: TrainingTask[E], state: TrainingState, trained: dict[str, Any], report: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """The epoch's metrics (its last training window's, then validation's), validation reported
    and the epoch ranked."""
    metrics = {**trained, "step": state.step, "epoch": state.epoch}
    validation = task.evaluate()
    if validation is None:
        return metrics
    metrics.update(validation)
    scalars = {k: v for k, v in validation.items() if isinstance(v, int | float)}
    report({"step": state.step, "epoch": state.epoch, **scalars})
    state.score(state.epoch, metrics, task.selection.metric, task.selection.higher_is_better)
    return metrics


def _keep_best(task: TrainingTask[E], state: TrainingState, run: TrainingRun, last: dict[str, Any]) -> dict[str, Any]:
    """The result's metrics; where the task keeps its best epoch, the weights of the best validated
    epoch whose checkpoint can be restored loaded back. One that cannot be (damaged in the store,
    gone) is passed over for the next best, and the result and a message say which and why; the
    last epoch's weights, which the model holds already, need no checkpoint."""
    selection = task.selection
    if not selection.keep_best or state.best is None:
        return last
    unrestorable: dict[str, str] = {}
    kept: EpochScore | None = None
    for score in state.ranked(selection.higher_is_better):
        try:
            if score.epoch != state.epoch:
                load_weights(checkpoint_source(run).fetch(score.epoch), task.model)
        except UNRESTORABLE as exc:
            unrestorable[str(score.epoch)] = str(exc)[:500]
            continue
        kept = score
        break
    if not unrestorable and kept is not None:
        run.hooks.message(f"Keeping epoch {kept.epoch}, the best on validation ({selection.metric}={kept.value:.4f})")
        return {**kept.metrics, "best_epoch": kept.epoch}
    why = "; ".join(f"epoch {epoch}: {error}" for epoch, error in unrestorable.items())
    if kept is None:  # the last epoch was not validated (an older checkpoint's state): its weights stay
        run.hooks.message(
            f"Keeping the last epoch, {state.epoch}: no validated epoch's checkpoint could be restored ({why})"[:2000]
        )
        return {**last, "best_epoch": state.epoch, "unrestorable_epochs": unrestorable}
    run.hooks.message(
        f"Keeping epoch {kept.epoch} ({selection.metric}={kept.value:.4f}), the best on validation whose checkpoint "
        f"could be restored; passed over as unrestorable: {why}"[:2000]
    )
    return {**kept.metrics, "best_epoch": kept.epoch, "unrestorable_epochs": unrestorable}


def checkpoint_source(run: TrainingRun) -> CheckpointSource:
    """Where the run's complete checkpoints are found: ``run.checkpoints``, else its work directory."""
    return run.checkpoints or LocalCheckpoints(run.work_dir)


def _scaled_loss(task: TrainingTask[E], batch: list[E], scale: float) -> torch.Tensor:
    return task.step(batch).loss / scale


class _Window:
    """Training loss, accuracy and throughput since the last metrics event."""

    def __init__(self, accuracy_name: str) -> None:
        self.accuracy_name = accuracy_name
        self.reset()

    def reset(self) -> None:
        self.loss, self.correct, self.counted, self.tokens = 0.0, 0, 0, 0
        self.start = time.perf_counter()

    def add(self, out: StepOutput) -> None:
        self.loss += out.loss.item() * out.counted
        self.correct += out.correct
        self.counted += out.counted
        self.tokens += out.tokens

    def flush(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        data = {
            "train_loss": self.loss / max(1, self.counted),
            self.accuracy_name: self.correct / max(1, self.counted),
            "tokens_per_second": self.tokens / elapsed,
        }
        self.reset()
        return data
