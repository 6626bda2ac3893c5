"""The kernel of LLM OS: memory (model residency), devices, and later the job scheduler."""

from llmos.kernel.devices import CpuInfo, GpuInfo, detect_cpu, detect_gpus
from llmos.kernel.memory import ModelResidency

__all__ = ["CpuInfo", "GpuInfo", "ModelResidency", "detect_cpu", "detect_gpus"]
