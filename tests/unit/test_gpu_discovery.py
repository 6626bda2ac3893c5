"""GPUs in device discovery: read through NVML (a faked ``pynvml`` here) or torch.cuda (faked),
and shown on this machine's node in ``/v1/admin/cluster``."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from llmos.cluster import machine
from llmos.kernel import devices
from llmos.kernel.devices import GpuInfo, gpus_from_nvml, gpus_from_torch

GIB = 1 << 30


@dataclass
class FakeDevice:
    """One device NVML enumerates (its handle is the object itself); ``utilization`` None: NVML
    answers Not Supported, as for MIG devices."""

    name: Any
    uuid: str
    total: int
    free: int
    utilization: int | None = None
    capability: tuple[int, int] = (8, 0)
    migs: list[FakeDevice] | None = None
    """The MIG devices of a GPU in MIG mode; None: no MIG support."""


H100 = FakeDevice(b"NVIDIA H100 80GB HBM3", "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6", 80 * GIB, 60 * GIB, 37, (9, 0))
A100 = FakeDevice(
    "NVIDIA A100-SXM4-40GB",
    "GPU-8932f937-0b2e-4f41-9c55-3a2b1d0e7f10",  # shares H100's first 8 digits: "GPU-8932f937" is ambiguous
    40 * GIB,
    20 * GIB,
    capability=(8, 0),
    migs=[
        FakeDevice("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f", 20 * GIB, 20 * GIB),
        FakeDevice("NVIDIA A100-SXM4-40GB MIG 2g.10gb", "MIG-0a1b2c3d-1111-5222-8333-444455556666", 10 * GIB, 9 * GIB),
    ],
)


class FakeNvml:
    """The part of pynvml that discovery calls, over ``devices`` in NVML's order (by default an
    H100 and an A100 in MIG mode). Counts init/shutdown so a leak shows."""

    NVML_DEVICE_MIG_ENABLE = 1

    class NVMLError(Exception):
        pass

    def __init__(self, devices: list[FakeDevice] | None = None) -> None:
        self.devices = [H100, A100] if devices is None else devices
        self.open = 0

    def nvmlInit(self) -> None:
        self.open += 1

    def nvmlShutdown(self) -> None:
        self.open -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> FakeDevice:
        return self.devices[i]

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeDevice) -> Any:
        return handle.name  # bytes from old pynvml

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> SimpleNamespace:
        return SimpleNamespace(total=handle.total, free=handle.free, used=handle.total - handle.free)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeDevice) -> SimpleNamespace:
        if handle.utilization is None:
            raise self.NVMLError("Not Supported")
        return SimpleNamespace(gpu=handle.utilization, memory=12)

    def nvmlDeviceGetCudaComputeCapability(self, handle: FakeDevice) -> tuple[int, int]:
        return handle.capability

    def nvmlDeviceGetMigMode(self, handle: FakeDevice) -> list[int]:
        if handle.migs is None:
            raise self.NVMLError("Not Supported")
        return [1, 1]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: FakeDevice) -> int:
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: FakeDevice, slot: int) -> FakeDevice:
        if handle.migs is None or slot >= len(handle.migs):
            raise self.NVMLError("Not Found")
        return handle.migs[slot]


def test_nvml_reports_each_gpu_s_name_memory_and_utilisation() -> None:
    nvml = FakeNvml()
    gpus = gpus_from_nvml(nvml, None)
    assert gpus == [
        GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 60 * GIB, 37.0, (9, 0)),
        GpuInfo(1, "NVIDIA A100-SXM4-40GB", 40 * GIB, 20 * GIB, None, (8, 0)),
    ]
    assert nvml.open == 0


def _seen(visible: str | None, devices: list[FakeDevice] | None = None) -> list[tuple[int, str]]:
    """(CUDA ordinal, name) of each GPU discovery reports under ``CUDA_VISIBLE_DEVICES = visible``."""
    return [(g.index, g.name) for g in gpus_from_nvml(FakeNvml(devices), visible)]


THREE = [H100, A100, FakeDevice("NVIDIA L4", "GPU-1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f", 24 * GIB, 24 * GIB)]


@pytest.mark.parametrize(
    ("visible", "seen"),
    [
        (None, [(0, "NVIDIA H100 80GB HBM3"), (1, "NVIDIA A100-SXM4-40GB"), (2, "NVIDIA L4")]),  # unset: all
        ("", []),  # empty: none
        ("1", [(0, "NVIDIA A100-SXM4-40GB")]),  # physical GPU 1 is CUDA's device 0
        ("2,0", [(0, "NVIDIA L4"), (1, "NVIDIA H100 80GB HBM3")]),  # in the list's order
        (" 2 , 1", [(0, "NVIDIA L4"), (1, "NVIDIA A100-SXM4-40GB")]),
        ("0,2,-1,1", [(0, "NVIDIA H100 80GB HBM3"), (1, "NVIDIA L4")]),  # the CUDA guide's example
        ("2,3,0", [(0, "NVIDIA L4")]),  # no device 3: the list ends there
        ("1gpu,0", [(0, "NVIDIA A100-SXM4-40GB"), (1, "NVIDIA H100 80GB HBM3")]),  # strtoul reads "1"
        ("0,abc,1", [(0, "NVIDIA H100 80GB HBM3")]),
        ("0,GPU-1c2d3e4f", [(0, "NVIDIA H100 80GB HBM3")]),  # indices first: a UUID ends the list
        ("-1", []),
        ("1,1", []),  # a device named twice: none
        ("GPU-1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f", [(0, "NVIDIA L4")]),
        ("GPU-1c2d,GPU-8932f937-d72c", [(0, "NVIDIA L4"), (1, "NVIDIA H100 80GB HBM3")]),  # unique prefixes
        ("GPU-1c2d,GPU-8932f937,GPU-8932f937-0b2e", [(0, "NVIDIA L4")]),  # ambiguous prefix ends the list
        ("GPU-1c2d,GPU-ffff,GPU-8932f937-0b2e", [(0, "NVIDIA L4")]),  # unknown UUID ends the list
        ("GPU-1c2d,0", [(0, "NVIDIA L4")]),  # UUIDs first: an index ends the list
        ("GPU-1c2d,GPU-1c2d3e4f", []),
    ],
)
def test_nvml_sees_the_gpus_cuda_visible_devices_shows_cuda(visible: str | None, seen: list[tuple[int, str]]) -> None:
    assert _seen(visible, THREE) == seen


def test_a_mig_device_is_read_by_its_uuid_and_cuda_enumerates_only_the_first_named() -> None:
    assert _seen("MIG-0a1b2c3d") == [(0, "NVIDIA A100-SXM4-40GB MIG 2g.10gb")]
    assert _seen("MIG-c6d4f1ef-42e4-5de3-91c7-45d71c87eb3f,MIG-0a1b2c3d") == [(0, "NVIDIA A100-SXM4-40GB MIG 3g.20gb")]
    mig = gpus_from_nvml(FakeNvml(), "MIG-c6d4")[0]
    assert (mig.memory_total_bytes, mig.memory_free_bytes, mig.utilization) == (20 * GIB, 20 * GIB, None)
    assert _seen("MIG-ffff") == []
    assert _seen("MIG-c6d4", [H100]) == [], "no GPU in MIG mode: no MIG device"


def test_discovery_reads_cuda_visible_devices_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [(g.index, g.name) for g in devices.detect_gpus()] == [(0, "NVIDIA A100-SXM4-40GB")]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.detect_gpus() == []
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert len(devices.detect_gpus()) == 2


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

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml())
    assert [g.utilization for g in devices.detect_gpus()] == [37.0, None]
    monkeypatch.setitem(sys.modules, "pynvml", NoDriver())
    monkeypatch.setattr(devices, "gpus_from_torch", lambda cuda: [GpuInfo(0, "from torch", 1, 1, None)])
    assert [g.name for g in devices.detect_gpus()] == ["from torch"]


def test_this_machine_s_node_lists_its_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "detect_gpus", lambda: gpus_from_nvml(FakeNvml(), None))
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
