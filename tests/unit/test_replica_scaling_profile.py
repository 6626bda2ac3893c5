"""``benchmarks/replica_scaling.py --decode-profile`` uses only decode steps measured on this
machine: another CPU or dtype steps several times faster or slower, and its figures say "this machine"."""

from __future__ import annotations

from typing import Any

import pytest
from benchmarks import replica_scaling

HERE = {"model": "AMD EPYC", "cores": 2, "flags": ["avx2"]}
CURVE = {"model": "smollm2-135m-instruct", "dtype": "float32"}


def _profile(cpu: dict[str, Any], dtype: str) -> dict[str, Any]:
    return {"model": "smollm2-135m-instruct", "dtype": dtype, "run": {"cpu": cpu}}


@pytest.fixture(autouse=True)
def _this_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica_scaling, "run_facts", lambda: {"cpu": HERE})


def test_a_profile_of_this_machine_is_taken() -> None:
    replica_scaling.refuse_foreign_profile(_profile(HERE, "float32"), CURVE, "p.json")


def test_a_profile_of_another_cpu_or_dtype_is_refused() -> None:
    intel = {"model": "Intel(R) Xeon(R) Processor", "cores": 2, "flags": ["avx2", "avx512f", "amx_bf16"]}
    with pytest.raises(SystemExit, match="CPU: 'Intel"):
        replica_scaling.refuse_foreign_profile(_profile(intel, "float32"), CURVE, "p.json")
    with pytest.raises(SystemExit, match="dtype: 'bfloat16' there, 'float32' here"):
        replica_scaling.refuse_foreign_profile(_profile(HERE, "bfloat16"), CURVE, "p.json")
