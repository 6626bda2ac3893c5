"""Where a job's trainer computes: the GPU its worker was given where the job asked for one (its
``gpus``, else the server's ``ray_job_gpus``), else the CPU. A worker that asked for a GPU and
sees none (no CUDA device in ``CUDA_VISIBLE_DEVICES``, or a torch built without CUDA) trains on
the CPU and says so in the job's events, rather than failing the job."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from llmos.kernel.devices import detect_cpu

T = TypeVar("T")

CPU = "cpu"
CUDA = "cuda"


def training_device(gpus: float, message: Callable[[str], None]) -> str:
    """``cuda`` where the job asked for ``gpus`` > 0 and torch sees a CUDA device, else ``cpu``
    (saying why through ``message`` when it asked for one)."""
    if gpus <= 0:
        return CPU
    if torch.cuda.is_available():
        return CUDA
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    message(
        f"This job asked for {gpus:g} GPU, but its worker sees no CUDA device (CUDA_VISIBLE_DEVICES="
        f"{'unset' if visible is None else repr(visible)}, torch {torch.__version__}): it trains on CPUs"
    )
    return CPU


def bf16_fast(device: str) -> bool:
    """Whether to autocast to bfloat16 on ``device``: a GPU that computes in it, a CPU with AMX /
    AVX-512 BF16."""
    if device == CUDA:
        return bool(torch.cuda.is_bf16_supported())
    return detect_cpu().bf16_fast


def model_device(model: Any) -> torch.device:
    """The device ``model``'s weights are on (the trainers move each batch there)."""
    return next(model.parameters()).device


def to_model(model: Any, inputs: T) -> T:
    """``inputs`` (a tensor, a tokenizer's ``BatchEncoding`` or a dict of tensors) on ``model``'s device."""
    device = model_device(model)
    if isinstance(inputs, dict) and not hasattr(inputs, "to"):
        return {k: v.to(device) for k, v in inputs.items()}  # type: ignore[return-value]
    return inputs.to(device)  # type: ignore[attr-defined]


def bf16_autocast(model: Any, enabled: bool) -> torch.autocast:
    """bfloat16 autocast (where ``enabled``) on the device ``model`` runs on."""
    return torch.autocast(model_device(model).type, dtype=torch.bfloat16, enabled=enabled)
