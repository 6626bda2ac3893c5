"""The optimizer side every training loop shares: AdamW over the trainable parameters, the
learning-rate schedule, clipping, and each method's own hook after a step (AdaLoRA re-allocates
its rank budget there, between ``optimizer.step`` and ``zero_grad``, while gradients exist)."""

from __future__ import annotations

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

    def step(self, state: dict[str, Any]) -> None:
        """Apply the accumulated gradients and count the step in ``state``."""
        torch.nn.utils.clip_grad_norm_(self.trainable, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        state["step"] += 1
        after_step(self.model, int(state["step"]))
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])
