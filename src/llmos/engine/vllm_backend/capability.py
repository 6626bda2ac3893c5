"""Whether vLLM serves a model here: the rule of docs/adr/0037, free of vllm, torch and NVML so it
is tested with faked inventories.

vLLM serves a chat or completion model when the settings allow it (``gpu_backend`` ``auto`` or
``vllm``), vllm is installed, the first visible NVIDIA GPU (the one vLLM takes; pick it with
``CUDA_VISIBLE_DEVICES``) has the memory vLLM is given free, vLLM knows the model's architecture
and its weights fit that memory. Anything else is served by the CPU backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmos.kernel.devices import GpuInfo

VLLM_EXTRA = 'pip install "llmos[vllm]"'
GENERATING_TASKS = frozenset({"chat", "completion"})


@dataclass(frozen=True)
class GpuOffer:
    """What this machine offers vLLM now."""

    vllm_version: str | None
    """The installed vllm's version; None: not installed."""
    gpus: Sequence[GpuInfo]
    architectures: frozenset[str]
    """The model architectures (``config.json``'s ``architectures``) this vllm implements; empty
    when vllm is not installed or there is no GPU (nothing is imported then)."""


@dataclass(frozen=True)
class Choice:
    vllm: bool
    reason: str
    """Why vLLM serves it or not (logged; a forced refusal's error message)."""


def machine_refusal(offer: GpuOffer, memory_fraction: float) -> str | None:
    """Why vLLM cannot serve any model here (None: it can)."""
    if offer.vllm_version is None:
        return f"vllm is not installed ({VLLM_EXTRA})"
    if not offer.gpus:
        return "no NVIDIA GPU is visible to this process (NVML and torch.cuda found none)"
    gpu = offer.gpus[0]
    wanted = int(gpu.memory_total_bytes * memory_fraction)
    if gpu.memory_free_bytes < wanted:
        return (
            f"GPU {gpu.index} ({gpu.name}) has {_mib(gpu.memory_free_bytes)} MiB free, less than the "
            f"{_mib(wanted)} MiB vllm_gpu_memory_utilization = {memory_fraction} gives vLLM"
        )
    return None


def model_refusal(
    offer: GpuOffer, architectures: Sequence[str], weight_bytes: int, memory_fraction: float
) -> str | None:
    """Why vLLM cannot serve a model with these architectures and weights (None: it can)."""
    if not architectures:
        return "its config.json names no architecture"
    if not offer.architectures.intersection(architectures):
        return f"vLLM {offer.vllm_version} does not implement {', '.join(architectures)}"
    given = int(offer.gpus[0].memory_total_bytes * memory_fraction)
    if weight_bytes >= given:
        return f"its weights ({_mib(weight_bytes)} MiB) do not fit the {_mib(given)} MiB of GPU memory vLLM is given"
    return None


def choose(
    setting: str,
    task: str,
    offer: GpuOffer,
    architectures: Sequence[str],
    weight_bytes: int,
    memory_fraction: float,
) -> Choice:
    """Whether vLLM serves a ``task`` model of these ``architectures`` and ``weight_bytes`` under
    ``gpu_backend = setting`` (a forced ``vllm`` still says no, with the reason, where it cannot)."""
    if task not in GENERATING_TASKS:
        return Choice(False, f"vLLM serves chat and completion models here, not {task} models")
    if setting == "torch":
        return Choice(False, "gpu_backend is torch")
    refusal = machine_refusal(offer, memory_fraction) or model_refusal(
        offer, architectures, weight_bytes, memory_fraction
    )
    if refusal is not None:
        return Choice(False, refusal)
    gpu = offer.gpus[0]
    return Choice(True, f"vLLM {offer.vllm_version} on GPU {gpu.index} ({gpu.name})")


def _mib(n: int) -> int:
    return n >> 20
