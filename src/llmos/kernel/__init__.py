"""The kernel of LLM OS: memory (model residency), devices, and later the job scheduler."""

from llmos.kernel.devices import CpuInfo, detect_cpu
from llmos.kernel.memory import ModelResidency

__all__ = ["CpuInfo", "ModelResidency", "detect_cpu"]
