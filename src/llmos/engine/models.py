"""Model references resolved once per request into a handle the request's later calls take.

Resolving reads the registry (the record, and for an adapter its base), picks the backend
(``engine.backends``) and the residency key its runner lives under, and loads the tokenizer
and any prefix- or prompt-tuning states once per model. Nothing is cached by name: a model
pulled, deleted or re-aliased by another process is seen by the next request.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
from jinja2 import TemplateError
from transformers import AutoConfig

from llmos.engine.backends import Backend, Backends
from llmos.engine.grammar import GrammarCompiler
from llmos.engine.protocol import ModelHandle, ModelInfo
from llmos.engine.tool_prompt import chat_with_tools
from llmos.engine.torch_backend.loader import CAUSAL_TASKS, check_draft_tokenizer, load_tokenizer
from llmos.engine.torch_backend.virtual_tokens import VirtualTokens, load_virtual_tokens
from llmos.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError
from llmos.registry import ModelRecord, ModelRegistry
from llmos.registry.adapters import ADAPTER_FORMATS, PREFIX_FORMAT

log = logging.getLogger(__name__)

TORCH_TWIN = "+torch"
"""Residency key suffix of the torch runner beside a model whose backend does not apply an
adapter of it (llama.cpp's adapters, vLLM's prefix- and prompt-tuning ones)."""


@dataclass(frozen=True)
class Resolution:
    """The engine's side of a ``ModelHandle``."""

    record: ModelRecord
    base: ModelRecord
    """Whose weights serve it: itself, or for an adapter the base it runs on."""
    key: str
    """The residency key of the runner that serves it."""
    backend: Backend
    tokenizer: Any
    virtual: VirtualTokens | None
    """A prefix- or prompt-tuning adapter's states, which go before every prompt."""

    @property
    def lora(self) -> bool:
        """A LoRA adapter, applied to its rows in its base's runner."""
        return self.base is not self.record and self.virtual is None


def resolution(model: ModelHandle) -> Resolution:
    if not isinstance(model.ref, Resolution):
        raise TypeError(f"{model.name!r} was not resolved by this engine")
    return model.ref


class ModelResolver:
    def __init__(self, registry: ModelRegistry, backends: Backends, dtype: torch.dtype) -> None:
        self.registry = registry
        self.backends = backends
        self.dtype = dtype
        self._lock = threading.Lock()
        self._tokenizers: dict[str, Any] = {}
        self._virtual: dict[str, VirtualTokens] = {}  # prefix/prompt-tuning adapters, by model id (small)
        self._grammars: dict[str, GrammarCompiler] = {}  # by model id, beside its tokenizer
        self._served: dict[str, tuple[ModelRecord, Backend]] = {}  # residency key -> what loads there
        self.names: dict[str, str] = {}  # model id -> name, for stats

    def resolve(self, model: str) -> ModelHandle:
        """Blocking (registry and files): call off the event loop."""
        record = self.registry.get(model)
        base = self._serving_base(record)
        backend = self.backends.for_model(base)
        key = base.id
        if base is not record and not backend.applies(record):  # llama.cpp's adapters, vLLM's prefix tuning
            backend, key = self.backends.named("torch"), base.id + TORCH_TWIN
        tokenizer = self._tokenizer(record, base)
        virtual = self._virtual_tokens(record, base)
        with self._lock:
            self._served[key] = (base, backend)
            self.names[record.id], self.names[base.id] = record.name, base.name
        info = ModelInfo(
            name=record.name,
            task=record.task,
            # An adapter's virtual tokens take positions of the context before every prompt.
            context_length=backend.context_length(base) - (virtual.length if virtual else 0),
            has_chat_template=record.task in CAUSAL_TASKS and bool(getattr(tokenizer, "chat_template", None)),
            vocab_size=len(tokenizer),
            scores_prompts=backend.scores_prompts,
            # A LoRA adapter's rows decode one token at a time (``speculative.speculates``).
            speculates=backend.speculates(base) and (record is base or virtual is not None),
        )
        return ModelHandle(name=model, info=info, ref=Resolution(record, base, key, backend, tokenizer, virtual))

    def check_drafts(self, pairs: dict[str, str]) -> None:
        """Raises ModelLoadError for a ``draft_models`` entry that cannot work (``Backend.draft_for``,
        and tokenizers whose ids differ). A target not registered yet is checked when it loads."""
        for target_name in pairs:
            try:
                target = self.registry.get(target_name)
            except ModelNotFoundError:
                continue
            draft = self.backends.for_model(target).draft_for(target)
            if draft is not None:
                tokenizers = self._tokenizer(target, target), self._tokenizer(draft, draft)
                check_draft_tokenizer(target.name, tokenizers[0], draft.name, tokenizers[1])

    def served(self, key: str) -> tuple[ModelRecord, Backend]:
        """What the runner under residency ``key`` serves, and with which backend (a key no
        request resolved yet is a model id, or one with ``TORCH_TWIN``)."""
        with self._lock:
            hit = self._served.get(key)
        if hit is not None:
            return hit
        record = self.registry.get(key.removesuffix(TORCH_TWIN))
        backend = self.backends.named("torch") if key.endswith(TORCH_TWIN) else self.backends.for_model(record)
        with self._lock:
            self._served[key] = (record, backend)
            self.names[record.id] = record.name
        return record, backend

    def forget(self, model_id: str) -> None:
        with self._lock:
            self._tokenizers.pop(model_id, None)
            self._grammars.pop(model_id, None)
            self._virtual.pop(model_id, None)

    def _serving_base(self, record: ModelRecord) -> ModelRecord:
        if record.format not in ADAPTER_FORMATS:
            return record
        if record.parent_id is None:
            raise ModelLoadError(f"adapter {record.name} has lost its base model")
        return self.registry.get(record.parent_id)

    def _tokenizer(self, record: ModelRecord, base: ModelRecord) -> Any:
        tok = self._tokenizers.get(record.id)
        if tok is None:
            directory = self.registry.model_dir(record)
            if record.format in ADAPTER_FORMATS and not (directory / "tokenizer_config.json").is_file():
                directory = self.registry.model_dir(base)  # adapters may ship no tokenizer
            tok = self._tokenizers[record.id] = load_tokenizer(directory)
        return tok

    def grammars(self, model: ModelHandle, *, budget: int, capacity: int) -> GrammarCompiler:
        """The grammar compiler (and cache) of ``model``'s tokenizer, built on first use (about a
        second: the tokenizer's vocabulary is indexed)."""
        served = resolution(model)
        with self._lock:
            compiler = self._grammars.get(served.record.id)
        if compiler is None:
            compiler = GrammarCompiler(served.tokenizer, budget=budget, capacity=capacity)
            with self._lock:
                compiler = self._grammars.setdefault(served.record.id, compiler)
        return compiler

    def _virtual_tokens(self, record: ModelRecord, base: ModelRecord) -> VirtualTokens | None:
        """The virtual tokens of a prefix- or prompt-tuning adapter, read once (a few hundred KB)."""
        if record.format != PREFIX_FORMAT:
            return None
        tokens = self._virtual.get(record.id)
        if tokens is None:
            config = AutoConfig.from_pretrained(self.registry.model_dir(base))
            tokens = load_virtual_tokens(self.registry.model_dir(record), record.id, config, self.dtype)
            self._virtual[record.id] = tokens
        return tokens


def encode_chat(
    model: ModelHandle, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> list[int]:
    tok = resolution(model).tokenizer
    messages, template_tools = chat_with_tools(tok, messages, tools)
    try:
        encoded = tok.apply_chat_template(messages, tools=template_tools, add_generation_prompt=True, tokenize=True)
    except Exception as exc:
        if type(exc) is TemplateError:  # the template's own raise_exception(): a message written for users
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from exc
        # Anything else (its subclasses included: a syntax error) is the tokenizer's internals: logged only.
        log.info("chat template failed on a request's messages: %s: %s", type(exc).__name__, exc)
        raise InvalidRequestError("the chat template could not render these messages", param="messages") from exc
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)


def encode_text(model: ModelHandle, text: str) -> list[int]:
    return list(resolution(model).tokenizer(text, add_special_tokens=True)["input_ids"])
