"""Device discovery: what the machine can do, injected where decisions depend on it.

CPUs through torch's capability probes; NVIDIA GPUs through NVML (``nvidia-ml-py``, imported as
``pynvml``) when it is installed, else through ``torch.cuda`` (which knows no utilisation). Both
readers take their library as an argument, so placement and backend choice are tested with a
faked inventory and no GPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class CpuInfo:
    cores: int
    bf16_fast: bool
    """True when the CPU has AVX-512 BF16 or AMX, where bfloat16 matmuls beat float32."""


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    utilization: float | None
    """Percent of the last sample period a kernel ran on it (NVML's ``gpu`` rate); None without NVML."""
    compute_capability: tuple[int, int] | None = None
    """CUDA compute capability (major, minor); None when the reader could not tell."""

    def public(self) -> dict[str, Any]:
        fields = asdict(self)
        cc = self.compute_capability
        fields["compute_capability"] = f"{cc[0]}.{cc[1]}" if cc else None
        return fields


def detect_cpu() -> CpuInfo:
    import torch

    bf16 = False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            bf16 = True
    return CpuInfo(cores=os.cpu_count() or 1, bf16_fast=bf16)


def detect_gpus() -> list[GpuInfo]:
    """The NVIDIA GPUs this process sees, now (free memory and utilisation change): through NVML
    when ``pynvml`` imports and initialises, else through ``torch.cuda``; none on a machine
    without a driver."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            return gpus_from_nvml(pynvml)
        except Exception:  # noqa: S110 - NVML without a driver (NVMLError_*): torch may still see the GPUs
            pass
    import torch

    return gpus_from_torch(torch.cuda)


def gpus_from_nvml(nvml: Any) -> list[GpuInfo]:
    """Read every device through NVML (``nvml``: the ``pynvml`` module, or a fake of it)."""
    nvml.nvmlInit()
    try:
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            name = nvml.nvmlDeviceGetName(handle)
            try:
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                utilization: float | None = float(rates.gpu)
            except Exception:  # some devices (MIG slices) report no utilisation
                utilization = None
            try:
                major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
                cc: tuple[int, int] | None = (int(major), int(minor))
            except Exception:
                cc = None
            gpus.append(
                GpuInfo(
                    index=i,
                    name=name.decode() if isinstance(name, bytes) else str(name),  # bytes before nvidia-ml-py 11.515
                    memory_total_bytes=int(memory.total),
                    memory_free_bytes=int(memory.free),
                    utilization=utilization,
                    compute_capability=cc,
                )
            )
        return gpus
    finally:
        nvml.nvmlShutdown()


def gpus_from_torch(cuda: Any) -> list[GpuInfo]:
    """Read every device through ``torch.cuda`` (``cuda``: the module, or a fake of it); it
    initialises CUDA in this process, which NVML does not."""
    if not cuda.is_available():
        return []
    gpus = []
    for i in range(cuda.device_count()):
        free, total = cuda.mem_get_info(i)
        major, minor = cuda.get_device_capability(i)
        gpus.append(
            GpuInfo(
                index=i,
                name=str(cuda.get_device_name(i)),
                memory_total_bytes=int(total),
                memory_free_bytes=int(free),
                utilization=None,
                compute_capability=(int(major), int(minor)),
            )
        )
    return gpus
