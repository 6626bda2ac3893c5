"""The torch backend: every task this platform serves, from safetensors."""

from __future__ import annotations

import torch

from llmos.engine.backends import LOAD_OVERHEAD_BYTES, Backend, Runner, register
from llmos.engine.torch_backend.loader import CAUSAL_TASKS, TASK_HEADS, load_runner
from llmos.registry import ModelRecord

_DTYPE_BYTES = {torch.bfloat16: 2, torch.float32: 4}


@register
class TorchBackend(Backend):
    name = "torch"
    scores_prompts = True

    def serves(self, record: ModelRecord) -> bool:
        return record.task in CAUSAL_TASKS or record.task in TASK_HEADS or record.task == "embedding"

    def estimate_bytes(self, record: ModelRecord) -> int:
        encoder = record.task == "embedding" or record.task in TASK_HEADS  # these load in float32
        width = 4 if encoder else _DTYPE_BYTES.get(self.dtype, 4)
        params = record.parameter_count or record.size_bytes // 2
        if record.task in CAUSAL_TASKS:
            width += _DTYPE_BYTES.get(self.dtype, 4)  # the lean step's oneDNN-packed copies (see torch_backend.packed)
        if record.task in CAUSAL_TASKS and self.config.decode_int8:
            width += 1  # the int8 copies read by single-row decode steps
        return int(params * width * 1.1) + LOAD_OVERHEAD_BYTES

    def load(self, record: ModelRecord) -> Runner:
        return load_runner(
            self.registry.model_dir(record),
            record.task,
            dtype=self.dtype,
            context_length=self.context_length(record),
            config=self.config,
            name=record.name,
        )
