"""The registry of backends: each says which models it serves and what they cost in memory.

A backend registers itself with ``register`` and a priority; the engine serves a model with the
highest-priority backend whose ``serves`` says yes (so a specialised backend, such as vLLM for
chat models on a GPU or llama.cpp for chat models kept as GGUF, is asked before the general torch
backend). No if-chain over
backend names lives anywhere else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

import torch

from llmos.engine.runner import GenerationRunner
from llmos.engine.torch_backend.classifier import ClassifierRunner
from llmos.engine.torch_backend.encoder import EncoderRunner
from llmos.engine.torch_backend.loader import CAUSAL_TASKS
from llmos.engine.torch_backend.token_classifier import TokenClassifierRunner
from llmos.errors import ModelLoadError, ModelNotFoundError
from llmos.registry.adapters import ADAPTER_FORMATS

if TYPE_CHECKING:
    from llmos.engine.config import EngineConfig
    from llmos.registry import ModelRecord, ModelRegistry

Runner = GenerationRunner | EncoderRunner | ClassifierRunner | TokenClassifierRunner

LOAD_OVERHEAD_BYTES = 64 << 20
"""What a loaded model costs beyond its weights and caches: tokenizer, Python objects, buffers."""


class Backend(ABC):
    name: ClassVar[str]
    priority: ClassVar[int] = 0
    """Backends with a higher priority are asked first."""
    scores_prompts: ClassVar[bool] = False
    """Whether its causal models return prompt logprobs (``SamplingParams.prompt_logprobs``)."""

    def __init__(self, registry: ModelRegistry, config: EngineConfig, dtype: torch.dtype) -> None:
        self.registry = registry
        self.config = config
        self.dtype = dtype

    @abstractmethod
    def serves(self, record: ModelRecord) -> bool:
        """Whether this backend serves ``record`` under the current settings."""

    @abstractmethod
    def estimate_bytes(self, record: ModelRecord) -> int:
        """Memory ``record`` takes once loaded by this backend (the residency budget's unit)."""

    @abstractmethod
    def load(self, record: ModelRecord) -> Runner:
        """A runner serving ``record`` (raises ModelLoadError)."""

    def speculates(self, record: ModelRecord) -> bool:
        """Whether a single stream of ``record``, a model this backend serves, drafts and verifies
        tokens (speculative decoding)."""
        return False

    drafts: ClassVar[bool] = False
    """Whether its chat models' single streams can speculate with a draft model (``draft_models``)."""

    def draft_for(self, record: ModelRecord) -> ModelRecord | None:
        """The model ``draft_models`` gives ``record`` to draft for it, or None; raises
        ModelLoadError where that cannot work: a draft model that is not registered, not a chat or
        completion model, an adapter, or a target this backend does not speculate with."""
        name = dict(self.config.draft_models).get(record.name) if self.config.draft_models else None
        if name is None:
            return None
        if not self.drafts:
            raise ModelLoadError(
                f"draft_models: {record.name} is served by the {self.name} backend, which does not draft with a model"
            )
        try:
            draft = self.registry.get(name)
        except ModelNotFoundError as exc:
            raise ModelLoadError(f"draft_models: {name}, the draft model of {record.name}, is not registered") from exc
        if draft.task not in CAUSAL_TASKS or draft.format in ADAPTER_FORMATS:
            raise ModelLoadError(f"draft_models: {name} is not a chat or completion model, so it cannot draft")
        if not self.speculates(record):
            raise ModelLoadError(
                f"draft_models gives {record.name} a draft model, but {record.name} does not speculate here "
                "(speculative_decoding, decode_weights int8, or under 'auto' no lean layers for its architecture)"
            )
        return draft

    def context_length(self, record: ModelRecord) -> int:
        """Positions a prompt and its answer may take on this backend."""
        return record.context_length or 2048

    def applies(self, adapter: ModelRecord) -> bool:
        """Whether its runner applies ``adapter`` (of a model it serves) itself; if not, the
        adapter's requests run on a torch runner of the base beside it (``engine.models``)."""
        return True


_REGISTERED: list[type[Backend]] = []


def register(cls: type[Backend]) -> type[Backend]:
    """Class decorator: make a backend available to every engine."""
    _REGISTERED.append(cls)
    _REGISTERED.sort(key=lambda c: -c.priority)
    return cls


class Backends:
    """One instance of every registered backend, for one engine."""

    def __init__(self, registry: ModelRegistry, config: EngineConfig, dtype: torch.dtype) -> None:
        # Importing the backends registers them.
        import llmos.engine.llamacpp_backend.backend
        import llmos.engine.torch_backend.backend
        import llmos.engine.vllm_backend.backend  # noqa: F401

        self.all = [cls(registry, config, dtype) for cls in _REGISTERED]

    def for_model(self, record: ModelRecord) -> Backend:
        for backend in self.all:
            if backend.serves(record):
                return backend
        raise ModelLoadError(f"model {record.name} has task {record.task!r}, which no backend serves")

    def named(self, name: str) -> Backend:
        return next(b for b in self.all if b.name == name)
