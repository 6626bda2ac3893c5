"""The torch backend: every task this platform serves, from safetensors."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig

from llmos.engine.backends import LOAD_OVERHEAD_BYTES, Backend, Runner, register
from llmos.engine.config import EngineConfig
from llmos.engine.torch_backend.int8 import int8_supported
from llmos.engine.torch_backend.lean_decode import reproduces
from llmos.engine.torch_backend.loader import CAUSAL_TASKS, TASK_HEADS, load_runner
from llmos.engine.torch_backend.speculative import verify_failed
from llmos.errors import ModelLoadError
from llmos.registry import ModelRecord, ModelRegistry
from llmos.registry.adapters import kv_width

_DTYPE_BYTES = {torch.bfloat16: 2, torch.float32: 4}


@register
class TorchBackend(Backend):
    name = "torch"
    scores_prompts = True
    drafts = True

    def __init__(self, registry: ModelRegistry, config: EngineConfig, dtype: torch.dtype) -> None:
        super().__init__(registry, config, dtype)
        self._configs: dict[str, Any] = {}  # model id -> its transformers config, read once

    def serves(self, record: ModelRecord) -> bool:
        return record.task in CAUSAL_TASKS or record.task in TASK_HEADS or record.task == "embedding"

    def estimate_bytes(self, record: ModelRecord) -> int:
        draft = self.draft_for(record) if record.task in CAUSAL_TASKS else None
        if draft is None:
            return self._own_bytes(record)
        # Its weights and packed copies, and its cache of one row, the length of the target's context.
        cache = kv_width(self._config(draft).to_dict()) * _DTYPE_BYTES.get(self.dtype, 4) * self.context_length(record)
        return self._own_bytes(record) + self._own_bytes(draft) - LOAD_OVERHEAD_BYTES + cache

    def draft_for(self, record: ModelRecord) -> ModelRecord | None:
        draft = super().draft_for(record)
        if draft is not None and not reproduces(self._config(draft)):
            raise ModelLoadError(
                f"draft_models: {draft.name} is not an architecture the lean decode step serves (Llama or Qwen2 "
                "without extra biases or sliding windows), so it cannot draft"
            )
        return draft

    def _config(self, record: ModelRecord) -> Any:
        config = self._configs.get(record.id)
        if config is None:
            config = self._configs[record.id] = AutoConfig.from_pretrained(self.registry.model_dir(record))
        return config

    def _own_bytes(self, record: ModelRecord) -> int:
        encoder = record.task == "embedding" or record.task in TASK_HEADS  # these load in float32
        width = 4 if encoder else _DTYPE_BYTES.get(self.dtype, 4)
        params = record.parameter_count or record.size_bytes // 2
        if record.task in CAUSAL_TASKS:
            width += _DTYPE_BYTES.get(self.dtype, 4)  # the lean step's oneDNN-packed copies (see torch_backend.packed)
        if record.task in CAUSAL_TASKS and self.config.decode_int8:
            width += 1  # the int8 copies read by single-row decode steps
        return int(params * width * 1.1) + LOAD_OVERHEAD_BYTES

    def speculates(self, record: ModelRecord) -> bool:
        """As ``Speculation.build`` decides for the loaded model: not when off, not when single rows
        decode int8 weights; under ``auto`` where the lean layers reproduce the model, under
        ``ngram`` wherever its cache can be rolled back (no sliding-window layers)."""
        mode = self.config.speculative_decoding
        if mode == "off" or record.task not in CAUSAL_TASKS or (self.config.decode_int8 and int8_supported(self.dtype)):
            return False
        config = self._config(record)
        if mode == "ngram":
            return "sliding_attention" not in (getattr(config, "layer_types", None) or [])
        # A probe at its load found that a verify does not reproduce its decode steps on this CPU
        # (the config read once names its directory: no materialising on every resolve).
        return reproduces(config) and not verify_failed(config.name_or_path)

    def load(self, record: ModelRecord) -> Runner:
        draft = self.draft_for(record) if record.task in CAUSAL_TASKS else None
        return load_runner(
            self.registry.model_dir(record),
            record.task,
            dtype=self.dtype,
            context_length=self.context_length(record),
            config=self.config,
            name=record.name,
            draft=(draft.name, self.registry.model_dir(draft)) if draft else None,
        )
