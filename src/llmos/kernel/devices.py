"""Device discovery (CPU for now): what the machine can do, injected where decisions depend on it."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuInfo:
    cores: int
    bf16_fast: bool
    """True when the CPU has AVX-512 BF16 or AMX, where bfloat16 matmuls beat float32."""


def detect_cpu() -> CpuInfo:
    import torch

    bf16 = False
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        fn = getattr(torch.cpu, probe, None)
        if fn is not None and fn():
            bf16 = True
    return CpuInfo(cores=os.cpu_count() or 1, bf16_fast=bf16)
