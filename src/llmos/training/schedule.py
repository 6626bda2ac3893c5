"""Learning-rate schedules: warmup, then linear decay, cosine or constant."""

from __future__ import annotations

import math
from collections.abc import Callable

from llmos.training.spec import TrainingSpec


def lr_schedule(spec: TrainingSpec, total_steps: int) -> Callable[[int], float]:
    warmup = int(spec.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if spec.lr_scheduler == "constant":
            return 1.0
        if spec.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return max(0.0, 1.0 - progress)

    return factor
