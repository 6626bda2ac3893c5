"""The optimizer side every training loop shares: AdamW over the trainable parameters, the
learning-rate schedule, clipping, and each method's own hook after a step (AdaLoRA re-allocates
its rank budget there, between ``optimizer.step`` and ``zero_grad``, while gradients exist)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmos.training.adapters import after_step
from llmos.training.schedule import lr_schedule
from llmos.training.spec import TrainingSpec


class Optimization:
    def __init__(self, model: Any, spec: TrainingSpec, total_steps: int, *, weight_decay: float) -> None:
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=spec.learning_rate, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(spec, total_steps))

    def step(self, number: int) -> None:
        """Apply the accumulated gradients as the run's optimizer step ``number`` (counted from 1)."""
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        after_step(self.model, number)
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])


@dataclass(frozen=True)
class Accumulation:
    """Gradient accumulation over one epoch of ``batches`` batches: an optimizer step after every
    ``every`` batches and after the last one, so an epoch's leftover batches are applied in that
    epoch (as ``TrainingSpec.total_steps`` counts them) instead of leaking into the next."""

    batches: int
    every: int

    def steps_after(self, b: int) -> bool:
        """Whether the optimizer steps once batch ``b`` (0-based) has been backpropagated."""
        return (b + 1) % self.every == 0 or b + 1 == self.batches

    def scale(self, b: int) -> float:
        """What batch ``b``'s loss is divided by: the number of batches in its group, so each
        step follows the mean loss of the batches it applies, the shorter last group included."""
        start = b - b % self.every
        return float(min(self.every, self.batches - start))
