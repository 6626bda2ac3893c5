"""The llama.cpp backend: chat models pulled from GGUF, served from their quantised file when
the settings ask for it (``gguf_backend = "llama.cpp"``)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from transformers import AutoConfig, GenerationConfig

from llmos.engine.backends import LOAD_OVERHEAD_BYTES, Backend, Runner, register
from llmos.engine.choices import eos_ids
from llmos.engine.llamacpp_backend.library import KV_BYTES_PER_VALUE
from llmos.engine.llamacpp_backend.runner import LlamaCppRunner
from llmos.engine.torch_backend.loader import CAUSAL_TASKS, load_tokenizer
from llmos.registry import ModelRecord
from llmos.registry.adapters import kv_width
from llmos.registry.formats import read_json


@register
class LlamaCppBackend(Backend):
    name = "llama.cpp"
    priority = 10

    def wanted(self, record: ModelRecord) -> bool:
        """Whether the settings and the model ask for this backend (without looking for the file)."""
        return self.config.gguf_backend == "llama.cpp" and record.task in CAUSAL_TASKS and "gguf_file" in record.extra

    def gguf(self, record: ModelRecord) -> Path:
        return self.registry.model_dir(record) / str(record.extra["gguf_file"])

    def serves(self, record: ModelRecord) -> bool:
        return self.wanted(record) and self.gguf(record).is_file()

    def context_length(self, record: ModelRecord) -> int:
        return min(super().context_length(record), self.config.llamacpp_cache_tokens)

    def applies(self, adapter: ModelRecord) -> bool:
        return False  # llama.cpp applies none of this platform's adapters

    def estimate_bytes(self, record: ModelRecord) -> int:
        """Its file (mapped) and its cache, allocated at load."""
        config = read_json(self.registry.model_dir(record) / "config.json")
        cache = self.config.llamacpp_cache_tokens * kv_width(config) * KV_BYTES_PER_VALUE
        return self.gguf(record).stat().st_size + cache + LOAD_OVERHEAD_BYTES

    def load(self, record: ModelRecord) -> Runner:
        model_dir = self.registry.model_dir(record)
        tokenizer = load_tokenizer(model_dir)
        configs = [AutoConfig.from_pretrained(model_dir)]
        with contextlib.suppress(OSError):  # a model may ship no generation config
            configs.insert(0, GenerationConfig.from_pretrained(model_dir))
        return LlamaCppRunner(
            self.gguf(record),
            tokenizer,
            eos_ids(configs, tokenizer),
            context_length=super().context_length(record),
            config=self.config,
            name=record.name,
        )
