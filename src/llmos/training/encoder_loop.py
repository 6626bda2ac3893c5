"""The training loop every encoder task shares (sequence classification, token classification):
shuffled batches, bf16 autocast in the task's step, gradient accumulation, metrics windows,
validation and an atomic checkpoint each epoch, resume from the last complete checkpoint,
early stopping, and the best validation epoch kept as the result.

A task supplies only what differs: its training examples, the loss of one batch, and its
validation metrics (one of which, ``select``, ranks the epochs: higher is better).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Generic, TypeVar

import torch

from llmos.training.adapters import merged, regularization, save_merged_copy
from llmos.training.adversarial import FGM
from llmos.training.checkpoints import SERVABLE, load_weights, resume_latest, save_epoch
from llmos.training.optim import Accumulation, Optimization
from llmos.training.run import TrainingResult, TrainingRun
from llmos.training.sft import Stopped

T = TypeVar("T")


@dataclass(frozen=True)
class StepOutput:
    """One batch: its mean loss (to backpropagate), how many predictions were right out of how
    many were counted (examples or labelled words), and how many input tokens it had."""

    loss: torch.Tensor
    correct: int
    counted: int
    tokens: int


@dataclass(frozen=True)
class EncoderTask(Generic[T]):
    description: str
    """What is trained, for the first message, e.g. "sequence classification on 100 examples"."""
    train: Sequence[T]
    step: Callable[[list[T]], StepOutput]
    evaluate: Callable[[], dict[str, Any]] | None
    """Validation metrics (``valid_*`` keys; scalars go to the metrics event, all to the checkpoint)."""
    select: str
    """The validation metric that ranks epochs (higher is better), e.g. ``valid_f1``."""


def train_encoder(
    model: Any,
    tokenizer: Any,
    task: EncoderTask[T],
    run: TrainingRun,
) -> TrainingResult:
    """Train ``model`` (already wrapped by its PEFT method) on ``task``; save the merged result,
    from the epoch with the best ``task.select`` when there is validation data, else the last."""
    spec, seed, work_dir, hooks = run.spec, run.seed, run.work_dir, run.hooks
    model.train()
    batches = math.ceil(len(task.train) / spec.batch_size)
    accumulation = Accumulation(batches, spec.gradient_accumulation_steps)
    total_steps = spec.total_steps(len(task.train))
    steps_per_epoch = total_steps // spec.n_epochs
    opt = Optimization(model, spec, total_steps, weight_decay=0.01)
    fgm = FGM(model, spec.fgm_epsilon) if spec.fgm_epsilon else None
    state: dict[str, Any] = {"epoch": 0, "step": 0, "trained_tokens": 0, "best": None, "bad_epochs": 0}
    state = resume_latest(work_dir, model, opt.optimizer, opt.scheduler, hooks.message) or state
    hooks.message(
        f"Training {spec.adapter} {task.description}, {spec.n_epochs} epochs ({total_steps} steps, "
        f"batch {spec.batch_size})"
    )
    log_every = max(1, steps_per_epoch // 10)
    metrics: dict[str, Any] = {}
    for epoch in range(int(state["epoch"]), spec.n_epochs):
        # Data order and dropout masks depend on the seed and the epoch only, so a run resumed from
        # a checkpoint ends with the very weights of one that was never stopped.
        torch.manual_seed(seed * 1000 + epoch)
        order = list(range(len(task.train)))
        random.Random(seed * 1000 + epoch).shuffle(order)  # noqa: S311 -- data order, not secrets
        window = _Window()
        for b in range(batches):
            reason = hooks.control()
            if reason:
                raise Stopped(reason)
            batch = [task.train[i] for i in order[b * spec.batch_size : (b + 1) * spec.batch_size]]
            out = task.step(batch)
            penalty = regularization(model)
            scale = accumulation.scale(b)
            ((out.loss if penalty is None else out.loss + penalty) / scale).backward()
            if fgm is not None:
                fgm.attack(partial(_scaled_loss, task, batch, scale))
            window.add(out)
            state["trained_tokens"] += out.tokens
            if not accumulation.steps_after(b):
                continue
            opt.step(state)
            if state["step"] % log_every == 0:
                hooks.metrics(
                    {
                        "step": state["step"],
                        **window.flush(),
                        "learning_rate": opt.learning_rate,
                        "epoch": epoch + 1,
                        "total_steps": total_steps,
                    }
                )
        state["epoch"] = epoch + 1
        metrics = {"step": state["step"], "epoch": epoch + 1}
        if task.evaluate is not None:
            metrics.update(task.evaluate())
            hooks.metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
            _rank_epoch(state, metrics, task.select)
        directory = save_epoch(
            work_dir, epoch + 1, model=model, optimizer=opt.optimizer, scheduler=opt.scheduler, state=state
        )
        save_merged_copy(model, spec, directory / SERVABLE)  # served as <model>:ckpt-step-N
        tokenizer.save_pretrained(directory / SERVABLE)
        hooks.checkpoint(int(state["step"]), epoch + 1, metrics, directory)
        if spec.early_stopping_patience is not None and state["bad_epochs"] >= spec.early_stopping_patience:
            hooks.message(f"Early stopping after epoch {epoch + 1}: {task.select} stopped improving")
            break
    best = state.get("best")
    if best is not None:
        if best["epoch"] != state["epoch"]:
            load_weights(work_dir / f"ckpt-epoch-{best['epoch']}", model)
        hooks.message(f"Keeping epoch {best['epoch']}, the best on validation ({task.select}={best['value']:.4f})")
        metrics = {**best["metrics"], "best_epoch": best["epoch"]}
    out_dir = work_dir / "result"
    merged(model, spec).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return TrainingResult(model_dir=out_dir, metrics=metrics, trained_tokens=int(state["trained_tokens"]))


def _scaled_loss(task: EncoderTask[T], batch: list[T], scale: float) -> torch.Tensor:
    return task.step(batch).loss / scale


def _rank_epoch(state: dict[str, Any], metrics: dict[str, Any], select: str) -> None:
    """Remember the best epoch so far (its metrics too, so a resumed run still knows them)."""
    best = state.get("best")
    if best is None or metrics[select] > best["value"]:
        state["best"] = {"epoch": metrics["epoch"], "value": metrics[select], "metrics": metrics}
        state["bad_epochs"] = 0
    else:
        state["bad_epochs"] = int(state.get("bad_epochs", 0)) + 1


class _Window:
    """Training loss, accuracy and throughput since the last metrics event."""

    def __init__(self) -> None:
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
            "train_accuracy": self.correct / max(1, self.counted),
            "tokens_per_second": self.tokens / elapsed,
        }
        self.reset()
        return data
