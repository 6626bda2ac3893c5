"""Device discovery: what the machine can do, injected where decisions depend on it.

CPUs through torch's capability probes; NVIDIA GPUs through NVML (``nvidia-ml-py``, imported as
``pynvml``) when it is installed, else through ``torch.cuda`` (which knows no utilisation and
holds a CUDA context on each GPU it reads). Both see the GPUs ``CUDA_VISIBLE_DEVICES`` lets CUDA
see, numbered as CUDA numbers them. Both readers take their library as an argument, so placement
and backend choice are tested with a faked inventory and no GPU.
"""

from __future__ import annotations

import os
import re
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
    without a driver. Both honour ``CUDA_VISIBLE_DEVICES`` as CUDA does (``visible_handles``), and
    each GPU's ``index`` is its CUDA ordinal."""
    try:
        import pynvml
    except ImportError:
        pynvml = None
    if pynvml is not None:
        try:
            return gpus_from_nvml(pynvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
        except Exception:  # noqa: S110 - NVML without a driver (NVMLError_*): torch may still see the GPUs
            pass
    import torch

    return gpus_from_torch(torch.cuda)


def gpus_from_nvml(nvml: Any, visible: str | None) -> list[GpuInfo]:
    """Read the devices CUDA would enumerate under ``CUDA_VISIBLE_DEVICES = visible`` (None: the
    variable is unset) through NVML (``nvml``: the ``pynvml`` module, or a fake of it)."""
    nvml.nvmlInit()
    try:
        return [_read_nvml(nvml, ordinal, handle) for ordinal, handle in enumerate(visible_handles(nvml, visible))]
    finally:
        nvml.nvmlShutdown()


def visible_handles(nvml: Any, visible: str | None) -> list[Any]:
    """The NVML handles of the devices CUDA makes visible, in CUDA's order (position = ordinal).

    NVML enumerates every physical GPU whatever ``CUDA_VISIBLE_DEVICES`` says, so the variable is
    applied here by CUDA's rules (the CUDA programming guide's environment-variable appendix; the
    corner cases as ``torch.cuda._parse_visible_devices`` reads them, so NVML's answer matches
    ``torch.cuda.device_count()``): unset, every GPU; empty, none; a list of indices, of
    ``GPU-<uuid>`` or of ``MIG-<uuid>`` names (a UUID may be shortened to a unique prefix), whose
    kind the first entry sets. The first entry that is not valid (a negative or too large index, an
    unknown or ambiguous UUID, an entry of another kind) ends the list; a device named twice leaves
    none. CUDA enumerates one MIG device only, the first named.

    Indices count in NVML's order (nvidia-smi's: by PCI bus), which is CUDA's own with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or where all GPUs are alike; CUDA's default order puts the
    fastest first, so on a machine with mixed GPUs name them by UUID or set that variable.
    """
    gpus = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    if visible is None:
        return gpus
    entries = visible.split(",")
    if visible.startswith("MIG-"):
        migs = _mig_handles(nvml, gpus)
        return [migs[i] for i in _named(entries[:1], [_uuid(nvml, h) for h in migs], "MIG-")]
    if visible.startswith("GPU-"):
        return [gpus[i] for i in _named(entries, [_uuid(nvml, h) for h in gpus], "GPU-")]
    return [gpus[i] for i in _indexed(entries, len(gpus))]


_LEADING_INT = re.compile(r"[+-]?\d+")


def _indexed(entries: list[str], count: int) -> list[int]:
    """The indices ``entries`` name, up to the first invalid one. Each is read as C's ``strtoul``
    reads it, as CUDA does: its leading digits (``1gpu`` is 1; no digits is invalid)."""
    chosen: list[int] = []
    for entry in entries:
        number = _LEADING_INT.match(entry.strip())
        index = int(number.group()) if number else -1
        if not 0 <= index < count:
            break
        if index in chosen:
            return []
        chosen.append(index)
    return chosen


def _named(entries: list[str], uuids: list[str], prefix: str) -> list[int]:
    """The positions in ``uuids`` of the devices ``entries`` name by UUID or a unique prefix of it,
    up to the first that is not a ``prefix`` name or names no single device."""
    chosen: list[int] = []
    for entry in entries:
        matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(entry)]
        if not entry.startswith(prefix) or len(matches) != 1:
            break
        if matches[0] in chosen:
            return []
        chosen.append(matches[0])
    return chosen


def _mig_handles(nvml: Any, gpus: list[Any]) -> list[Any]:
    """The MIG devices of the GPUs in MIG mode, GPU by GPU."""
    migs = []
    for gpu in gpus:
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(gpu)
        except nvml.NVMLError:  # a GPU without MIG support
            continue
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            continue
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(gpu)):
            try:
                migs.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(gpu, slot))
            except nvml.NVMLError:  # no MIG device in that slot
                continue
    return migs


def _uuid(nvml: Any, handle: Any) -> str:
    return _text(nvml.nvmlDeviceGetUUID(handle))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)  # bytes before nvidia-ml-py 11.515


def _read_nvml(nvml: Any, ordinal: int, handle: Any) -> GpuInfo:
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
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
    return GpuInfo(
        index=ordinal,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_bytes=int(memory.total),
        memory_free_bytes=int(memory.free),
        utilization=utilization,
        compute_capability=cc,
    )


def gpus_from_torch(cuda: Any) -> list[GpuInfo]:
    """Read every device through ``torch.cuda`` (``cuda``: the module, or a fake of it), which
    applies ``CUDA_VISIBLE_DEVICES`` itself: ``i`` is already the CUDA ordinal.

    Unlike NVML it costs GPU memory for as long as this process lives: names and compute
    capabilities come from the device properties, but free memory only from ``cudaMemGetInfo``,
    which runs in the device's primary CUDA context, so ``mem_get_info`` creates one on each GPU
    read and torch offers no call to release it. Hence NVML first (``nvidia-ml-py``, in the vllm
    extra) and this only without it."""
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
