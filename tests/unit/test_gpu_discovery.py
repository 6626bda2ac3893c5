"""GPUs in device discovery: read through NVML (a faked ``pynvml`` here) or torch.cuda (faked),
and shown on this machine's node in ``/v1/admin/cluster``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from llmos.cluster import machine
from llmos.kernel import devices
from llmos.kernel.devices import GpuInfo, gpus_from_nvml, gpus_from_torch

GIB = 1 << 30


class FakeNvml:
    """The part of pynvml that discovery calls, for two GPUs; the second (a MIG slice) reports no
    utilisation. Counts init/shutdown so a leak shows."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.open = 0

    def nvmlInit(self) -> None:
        self.open += 1

    def nvmlShutdown(self) -> None:
        self.open -= 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, handle: int) -> Any:
        return [b"NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-40GB MIG 3g.20gb"][handle]  # bytes from old pynvml

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return [
            SimpleNamespace(total=80 * GIB, free=60 * GIB, used=20 * GIB),
            SimpleNamespace(total=20 * GIB, free=20 * GIB, used=0),
        ][handle]

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        if handle == 1:
            raise self.NVMLError("Not Supported")
        return SimpleNamespace(gpu=37, memory=12)

    def nvmlDeviceGetCudaComputeCapability(self, handle: int) -> tuple[int, int]:
        return (9, 0) if handle == 0 else (8, 0)


def test_nvml_reports_each_gpu_s_name_memory_and_utilisation() -> None:
    nvml = FakeNvml()
    gpus = gpus_from_nvml(nvml)
    assert gpus == [
        GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 60 * GIB, 37.0, (9, 0)),
        GpuInfo(1, "NVIDIA A100-SXM4-40GB MIG 3g.20gb", 20 * GIB, 20 * GIB, None, (8, 0)),
    ]
    assert nvml.open == 0


def test_torch_cuda_reports_gpus_without_utilisation() -> None:
    cuda = SimpleNamespace(
        is_available=lambda: True,
        device_count=lambda: 1,
        mem_get_info=lambda i: (70 * GIB, 80 * GIB),
        get_device_name=lambda i: "NVIDIA H100 80GB HBM3",
        get_device_capability=lambda i: (9, 0),
    )
    assert gpus_from_torch(cuda) == [GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 70 * GIB, None, (9, 0))]
    assert gpus_from_torch(SimpleNamespace(is_available=lambda: False)) == []


def test_nvml_is_preferred_and_torch_read_when_nvml_has_no_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoDriver(FakeNvml):
        def nvmlInit(self) -> None:
            raise self.NVMLError("Driver Not Loaded")

    import sys

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    assert [g.utilization for g in devices.detect_gpus()] == [37.0, None]
    monkeypatch.setitem(sys.modules, "pynvml", NoDriver())
    monkeypatch.setattr(devices, "gpus_from_torch", lambda cuda: [GpuInfo(0, "from torch", 1, 1, None)])
    assert [g.name for g in devices.detect_gpus()] == ["from torch"]


def test_this_machine_s_node_lists_its_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "detect_gpus", lambda: gpus_from_nvml(FakeNvml()))
    node = machine.this_machine().public()
    assert node["resources"]["GPU"] == 2.0
    assert node["gpus"][0] == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "memory_total_bytes": 80 * GIB,
        "memory_free_bytes": 60 * GIB,
        "utilization": 37.0,
        "compute_capability": "9.0",
    }
