"""What the torch backend reserves for a model before loading it: the weights in the serving dtype,
and for causal models the lean step's oneDNN-packed copies of them (ADR 0039: float32 too)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from llmos.config import Settings
from llmos.engine.backends import LOAD_OVERHEAD_BYTES
from llmos.engine.config import EngineConfig
from llmos.engine.torch_backend.backend import TorchBackend

PARAMETERS = 100_000_000


def _estimate(tmp_path: Path, dtype: torch.dtype, task: str) -> int:
    backend = TorchBackend(Any, EngineConfig.from_settings(Settings(home=tmp_path)), dtype)  # type: ignore[arg-type]
    record = SimpleNamespace(task=task, parameter_count=PARAMETERS, size_bytes=0)
    return backend.estimate_bytes(record) - LOAD_OVERHEAD_BYTES  # type: ignore[arg-type]


@pytest.mark.parametrize(("dtype", "width"), [(torch.bfloat16, 2), (torch.float32, 4)])
def test_a_causal_model_reserves_its_weights_and_their_packed_copies(
    tmp_path: Path, dtype: torch.dtype, width: int
) -> None:
    assert _estimate(tmp_path, dtype, "chat") == int(PARAMETERS * 2 * width * 1.1)


def test_an_encoder_reserves_its_float32_weights_once(tmp_path: Path) -> None:
    assert _estimate(tmp_path, torch.bfloat16, "embedding") == int(PARAMETERS * 4 * 1.1)
