"""The in-process engine: registry models made resident on demand, one runner per model."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import logging
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch
from transformers import AutoConfig, GenerationConfig

from llmos.config import Settings
from llmos.engine import threads
from llmos.engine.choices import eos_ids
from llmos.engine.config import EngineConfig
from llmos.engine.llamacpp_backend import LlamaCppRunner
from llmos.engine.llamacpp_backend.library import KV_BYTES_PER_VALUE
from llmos.engine.protocol import (
    ClassificationResult,
    EmbeddingResult,
    EntityResult,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
)
from llmos.engine.runner import GenerationRunner
from llmos.engine.torch_backend import CausalRunner, EncoderRunner
from llmos.engine.torch_backend.classifier import ClassifierRunner
from llmos.engine.torch_backend.loader import CAUSAL_TASKS, TASK_HEADS, load_runner, load_tokenizer
from llmos.engine.torch_backend.lora import LoraWeights, load_lora
from llmos.engine.torch_backend.token_classifier import TokenClassifierRunner
from llmos.engine.torch_backend.virtual_tokens import VirtualTokens, load_virtual_tokens
from llmos.errors import InvalidRequestError, ModelLoadError, ServiceUnavailableError
from llmos.kernel import ModelResidency, detect_cpu
from llmos.registry import ModelRecord, ModelRegistry
from llmos.registry.adapters import ADAPTER_FORMATS, PREFIX_FORMAT, kv_width
from llmos.registry.formats import read_json

log = logging.getLogger(__name__)
Runner = GenerationRunner | EncoderRunner | ClassifierRunner | TokenClassifierRunner
R = TypeVar("R", bound=Runner)
T = TypeVar("T")
_DTYPE_BYTES = {torch.bfloat16: 2, torch.float32: 4}
GIL_SWITCH_INTERVAL_S = 0.0002
TORCH_TWIN = "+torch"  # residency key suffix: the torch runner of a model llama.cpp serves, for its adapters
RESOLVE_TTL_S = 2.0  # a model pulled or deleted by another process is seen within this
Sink = Callable[[GenerationDelta], None]
RestartHook = Callable[[str, str, bool], None]


def resolve_dtype(setting: str) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if detect_cpu().bf16_fast else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


class LocalEngine:
    """Implements ``EngineClient`` over the PyTorch backend in this process."""

    def __init__(self, registry: ModelRegistry, settings: Settings, *, on_restart: RestartHook | None = None) -> None:
        """``on_restart(model, reason, restarted)`` is told each time a crashed engine loop has been
        restarted, or the restart failed (the platform writes it to the audit log)."""
        self.registry = registry
        self.on_restart = on_restart
        self.settings = settings
        self.config = EngineConfig.from_settings(settings)
        self.dtype = resolve_dtype(settings.dtype)
        threads.configure(settings.threads)
        self._helpers = threads.helper_pool()
        # The engine thread re-takes the GIL after each of the ~600 torch ops of a forward pass; with
        # the default 5 ms switch interval it waits behind the event loop thread (a GIL convoy).
        # Measured through the server with 1 client: 16 tokens/s at 5 ms, 23 tokens/s at 0.2 ms.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        self.residency: ModelResidency[Runner] = ModelResidency(
            settings.memory_budget_mb * 1024 * 1024, self._load, _unload, self._estimate_size
        )
        self._records: dict[str, ModelRecord] = {}
        self._resolved: dict[str, tuple[float, ModelRecord]] = {}
        self._tokenizers: dict[str, Any] = {}
        self._virtual: dict[str, VirtualTokens] = {}  # prefix/prompt-tuning adapters, by model id (small)
        self._inflight: dict[str, Runner] = {}
        self._pending = 0
        # Crash handling: the sinks of running generations (to fail them if their engine loop
        # dies), the models whose loop is being restarted, and how many restarts there were.
        self._sinks: dict[str, tuple[Sink, int]] = {}
        self._crash_lock = threading.Lock()
        self._restarting: set[str] = set()
        self.restarts = 0

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn`` on a helper thread, which runs torch on one core (see ``threads``)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._helpers, partial(context.run, fn, *args))

    # -- model facts -----------------------------------------------------------------------
    def _record(self, model: str) -> ModelRecord:
        """Resolve a model reference. One request asks up to four times (info, prompt, generate),
        so answers are kept for a moment instead of querying the database each time; ``unload``
        forgets them at once when a model is deleted here."""
        now = time.monotonic()
        hit = self._resolved.get(model)
        if hit is not None and now - hit[0] < RESOLVE_TTL_S:
            return hit[1]
        record = self.registry.get(model)
        self._records[record.id] = record
        self._resolved[model] = (now, record)
        return record

    def _serving_base(self, record: ModelRecord) -> ModelRecord:
        """The model whose weights serve ``record``: itself, or for an adapter the base it runs on."""
        if record.format not in ADAPTER_FORMATS:
            return record
        if record.parent_id is None:
            raise ModelLoadError(f"adapter {record.name} has lost its base model")
        return self._record(record.parent_id)

    def _tokenizer(self, record: ModelRecord) -> Any:
        tok = self._tokenizers.get(record.id)
        if tok is None:
            directory = self.registry.model_dir(record)
            if record.format in ADAPTER_FORMATS and not (directory / "tokenizer_config.json").is_file():
                directory = self.registry.model_dir(self._serving_base(record))  # adapters may ship no tokenizer
            tok = self._tokenizers[record.id] = load_tokenizer(directory)
        return tok

    async def model_info(self, model: str) -> ModelInfo:
        record = await self._off_loop(self._record, model)
        tok = await self._off_loop(self._tokenizer, record)
        has_template = record.task in CAUSAL_TASKS and bool(getattr(tok, "chat_template", None))
        virtual = await self._virtual_tokens_of(record)
        return ModelInfo(
            name=record.name,
            task=record.task,
            # An adapter's virtual tokens take positions of the context before every prompt.
            context_length=self._context_length(record) - (virtual.length if virtual else 0),
            has_chat_template=has_template,
            vocab_size=len(tok),
        )

    def _context_length(self, record: ModelRecord) -> int:
        """Positions a prompt and its answer may take: the model's, at most the llama.cpp cache
        when that backend serves it."""
        context = record.context_length or 2048
        if self._wants_llamacpp(record):  # (without looking for the file: asked on the event loop)
            context = min(context, self.settings.llamacpp_cache_tokens)
        return context

    def _wants_llamacpp(self, record: ModelRecord) -> bool:
        return self.settings.gguf_backend == "llama.cpp" and record.task in CAUSAL_TASKS and "gguf_file" in record.extra

    async def encode_chat(self, model: str, messages: list[dict[str, str]]) -> list[int]:
        record = await self._off_loop(self._record, model)
        tok = await self._off_loop(self._tokenizer, record)
        try:
            encoded = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # jinja templates raise arbitrary errors on unexpected roles
            raise InvalidRequestError(f"the chat template rejected these messages: {exc}", param="messages") from exc
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return list(ids)

    async def encode_text(self, model: str, text: str) -> list[int]:
        record = await self._off_loop(self._record, model)
        tok = await self._off_loop(self._tokenizer, record)
        return list(tok(text, add_special_tokens=True)["input_ids"])

    # -- work ------------------------------------------------------------------------------
    def check_capacity(self) -> None:
        if self._pending >= self.settings.max_pending_requests:
            raise ServiceUnavailableError("the server is at capacity; retry shortly", retry_after=1.0)

    def _admit(self) -> None:
        self.check_capacity()  # again: requests admitted at the edge may have filled it since
        self._pending += 1

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        record = await self._off_loop(self._record, request.model)
        base = await self._off_loop(self._serving_base, record)
        # Adapters of a model that llama.cpp serves run on a torch runner of the same model beside it.
        key = base.id + TORCH_TWIN if base is not record and self._wants_llamacpp(base) else base.id
        self._admit()
        try:
            runner = await self._off_loop(self.residency.acquire, key)
        except BaseException:
            self._pending -= 1
            raise
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[GenerationDelta] = asyncio.Queue()
        remaining = request.params.n
        adapter: str | None = None
        virtual: VirtualTokens | None = None
        try:
            if not isinstance(runner, GenerationRunner):
                raise InvalidRequestError(f"model {request.model} cannot generate text", param="model")
            virtual = await self._virtual_tokens_of(record) if isinstance(runner, CausalRunner) else None
            runner.check_fits(request, virtual)
            if isinstance(runner, CausalRunner) and base is not record and virtual is None:
                # LoRA: loaded beside its base, off the engine thread
                await self._off_loop(runner.lora.acquire, record.id, partial(self._load_adapter, record))
                adapter = record.id

            def deliver(delta: GenerationDelta) -> None:  # called on the engine thread
                loop.call_soon_threadsafe(deltas.put_nowait, delta)

            with self._crash_lock:  # a loop that dies after this fails the request (see _on_crash)
                if runner.crashed is not None:
                    raise ServiceUnavailableError(
                        f"the engine for {request.model} crashed and is restarting; retry shortly", retry_after=1.0
                    )
                self._inflight[request.request_id] = runner
                self._sinks[request.request_id] = (deliver, request.params.n)
            runner.submit(request, deliver, adapter, virtual)
            while remaining > 0:
                delta = await deltas.get()
                if delta.finish_reason is not None:
                    remaining -= 1
                yield delta
        finally:
            if remaining > 0 and isinstance(runner, GenerationRunner):
                runner.abort(request.request_id)  # client gone or consumer stopped early
            with self._crash_lock:
                self._inflight.pop(request.request_id, None)
                self._sinks.pop(request.request_id, None)
            if adapter is not None and isinstance(runner, CausalRunner):
                runner.lora.release(adapter)
            self.residency.release(key, runner)  # a no-op if this runner crashed and was replaced
            self._pending -= 1

    def _load_adapter(self, record: ModelRecord, shapes: dict[str, tuple[int, int]]) -> LoraWeights:
        return load_lora(self.registry.model_dir(record), record.id, shapes, self.dtype)

    async def _virtual_tokens_of(self, record: ModelRecord) -> VirtualTokens | None:
        """Every request asks; only prefix adapters need a thread (their file may be read once)."""
        if record.format != PREFIX_FORMAT:
            return None
        return await self._off_loop(self._virtual_tokens, record)

    def _virtual_tokens(self, record: ModelRecord) -> VirtualTokens | None:
        """The virtual tokens of a prefix- or prompt-tuning adapter (None for any other model),
        read once: they are a few hundred kilobytes."""
        if record.format != PREFIX_FORMAT:
            return None
        tokens = self._virtual.get(record.id)
        if tokens is None:
            base = self._serving_base(record)
            config = AutoConfig.from_pretrained(self.registry.model_dir(base))
            tokens = load_virtual_tokens(self.registry.model_dir(record), record.id, config, self.dtype)
            self._virtual[record.id] = tokens
        return tokens

    async def embed(self, model: str, inputs: list[str] | list[list[int]]) -> EmbeddingResult:
        return await self._on_runner(model, "embedding", "an embedding model", EncoderRunner, lambda r: r.embed(inputs))

    async def classify(self, model: str, inputs: list[str]) -> ClassificationResult:
        return await self._on_runner(
            model, "sequence-classification", "a classifier", ClassifierRunner, lambda r: r.classify(inputs)
        )

    async def extract_entities(self, model: str, inputs: list[str]) -> EntityResult:
        return await self._on_runner(
            model,
            "token-classification",
            "a token-classification (NER) model",
            TokenClassifierRunner,
            lambda r: r.extract(inputs),
        )

    async def _on_runner(self, model: str, task: str, what: str, kind: type[R], work: Callable[[R], T]) -> T:
        """Run ``work`` on the resident runner of ``model`` (a ``task`` model, else 400), off the event loop."""
        record = await self._off_loop(self._record, model)
        if record.task != task:
            raise InvalidRequestError(f"model {model} is a {record.task} model, not {what}", param="model")
        self._admit()
        try:
            return await self._off_loop(self._use_runner, record.id, kind, work)
        finally:
            self._pending -= 1

    def _use_runner(self, model_id: str, kind: type[R], work: Callable[[R], T]) -> T:
        with self.residency.use(model_id) as runner:
            assert isinstance(runner, kind)
            return work(runner)

    async def abort(self, request_id: str) -> None:
        runner = self._inflight.get(request_id)
        if isinstance(runner, GenerationRunner):
            runner.abort(request_id)

    def stats(self) -> dict[str, Any]:
        """Counters for operators and tests: what is resident, running and computed."""
        models = {}
        for model_id in self.residency.resident():
            record = self._records.get(model_id.removesuffix(TORCH_TWIN))
            runner = self.residency.peek(model_id)
            entry: dict[str, Any] = {"name": record.name if record else model_id}
            if model_id.endswith(TORCH_TWIN):
                entry["serves"] = "adapters"  # the torch runner beside a model llama.cpp serves
            if isinstance(runner, CausalRunner):
                entry.update(
                    busy=runner.busy,
                    tokens_generated=runner.tokens_generated,
                    prefills=runner.prefills,
                    peak_rows=runner.peak_rows,
                    adapters=[
                        self._records[a].name if a in self._records else a
                        for a in runner.lora.resident() + runner.virtual.resident()
                    ],
                    adapter_bytes=runner.lora.used_bytes,
                    adapter_copy_bytes=runner.adapter_copy_bytes,
                    adapters_fusing=runner.adapters_fusing,
                    adapter_loads=runner.lora.loads,
                    prefill_tokens=runner.prefill_tokens,
                    prefix_cache_hits=runner.prefix_cache.hits,
                    prefix_tokens_reused=runner.prefix_cache.tokens_reused,
                    prefix_cache_bytes=runner.prefix_cache.used_bytes,
                    kv_cache_bytes=runner.kv_bytes,
                    kv_cache_budget_bytes=runner.kv_budget.budget_bytes,
                    rows_parked=runner.rows_parked,
                )
            elif isinstance(runner, LlamaCppRunner):
                entry.update(
                    backend="llama.cpp",
                    busy=runner.busy,
                    tokens_generated=runner.tokens_generated,
                    prefills=runner.prefills,
                    peak_rows=runner.peak_rows,
                    prefill_tokens=runner.prefill_tokens,
                    prefix_cache_hits=runner.prefix_hits,
                    prefix_tokens_reused=runner.prefix_tokens_reused,
                    kv_cache_bytes=runner.kv_bytes,
                    kv_cache_budget_bytes=runner.cache_bytes,
                )
            models[model_id] = entry
        return {
            "pending_requests": self._pending,
            "engine_restarts": self.restarts,
            "dtype": str(self.dtype).removeprefix("torch."),
            "memory_budget_bytes": self.residency.budget,
            "resident_bytes": self.residency.used_bytes,
            "models": models,
        }

    async def check_health(self) -> None:
        if self._restarting:
            ids = [m.removesuffix(TORCH_TWIN) for m in self._restarting]
            names = sorted(self._records[m].name if m in self._records else m for m in ids)
            raise ServiceUnavailableError(f"the engine is restarting after a crash: {', '.join(names)}")
        await self._off_loop(self.registry.list)

    async def unload(self, model_id: str) -> None:
        self._resolved = {ref: hit for ref, hit in self._resolved.items() if hit[1].id != model_id}
        await self._off_loop(self.residency.evict, model_id)
        await self._off_loop(self.residency.evict, model_id + TORCH_TWIN)
        for resident in self.residency.resident():
            runner = self.residency.peek(resident)
            if isinstance(runner, CausalRunner):
                runner.lora.evict(model_id)
                runner.virtual.evict(model_id)
        self._tokenizers.pop(model_id, None)
        self._virtual.pop(model_id, None)

    async def shutdown(self) -> None:
        await self._off_loop(self.residency.close)

    # -- residency callbacks ---------------------------------------------------------------
    def _estimate_size(self, model_id: str) -> int:
        record = self._records[model_id.removesuffix(TORCH_TWIN)]
        gguf = None if model_id.endswith(TORCH_TWIN) else self._served_gguf(record)
        if gguf is not None:  # its file (mapped) and its cache, allocated at load
            config = read_json(self.registry.model_dir(record) / "config.json")
            cache = self.settings.llamacpp_cache_tokens * kv_width(config) * KV_BYTES_PER_VALUE
            return gguf.stat().st_size + cache + (64 << 20)
        width = 4 if record.task == "embedding" or record.task in TASK_HEADS else _DTYPE_BYTES.get(self.dtype, 4)
        params = record.parameter_count or record.size_bytes // 2
        if record.task in CAUSAL_TASKS and self.dtype == torch.bfloat16:
            width += 2  # the lean step's oneDNN-packed copies (see torch_backend.packed)
        if record.task in CAUSAL_TASKS and self.settings.decode_weights == "int8":
            width += 1  # the int8 copies read by single-row decode steps
        return int(params * width * 1.1) + (64 << 20)

    def _served_gguf(self, record: ModelRecord) -> Path | None:
        """The GGUF file llama.cpp serves ``record`` from, if the settings and the model say so."""
        if not self._wants_llamacpp(record):
            return None
        path = self.registry.model_dir(record) / str(record.extra["gguf_file"])
        return path if path.is_file() else None

    def _load_llamacpp(self, record: ModelRecord, gguf: Path) -> LlamaCppRunner:
        model_dir = self.registry.model_dir(record)
        tokenizer = load_tokenizer(model_dir)
        configs = [AutoConfig.from_pretrained(model_dir)]
        with contextlib.suppress(OSError):  # a model may ship no generation config
            configs.insert(0, GenerationConfig.from_pretrained(model_dir))
        return LlamaCppRunner(
            gguf,
            tokenizer,
            eos_ids(configs, tokenizer),
            context_length=record.context_length or 2048,
            config=self.config,
            name=record.name,
        )

    def _load(self, model_id: str) -> Runner:
        record = self._records[model_id.removesuffix(TORCH_TWIN)]
        model_dir: Path = self.registry.model_dir(record)
        gguf = None if model_id.endswith(TORCH_TWIN) else self._served_gguf(record)
        runner = self._load_llamacpp(record, gguf) if gguf is not None else self._load_torch(record, model_dir)
        if isinstance(runner, GenerationRunner):  # its thread starts with its first request
            runner.on_crash = partial(self._on_crash, model_id, runner)
        return runner

    def _load_torch(self, record: ModelRecord, model_dir: Path) -> Runner:
        return load_runner(
            model_dir,
            record.task,
            dtype=self.dtype,
            context_length=record.context_length or 2048,
            config=self.config,
            name=record.name,
        )

    # -- crash and restart -----------------------------------------------------------------
    def _on_crash(self, model_id: str, runner: GenerationRunner, exc: BaseException) -> None:
        """Called on the dying engine thread: fail every request it had, forget the runner, and
        load a fresh one in the background (until then /ready answers 503)."""
        reason = f"{type(exc).__name__}: {exc}"
        with self._crash_lock:
            victims = [self._sinks[rid] for rid, r in self._inflight.items() if r is runner and rid in self._sinks]
            self.residency.discard(model_id, runner)
            self._restarting.add(model_id)
        log.error("engine loop of %s crashed (%s); failing %d request(s)", runner.name, reason, len(victims))
        message = f"the engine crashed while serving this request ({reason}); it is being restarted, retry shortly"
        for sink, n in victims:
            for index in range(n):
                sink(GenerationDelta(index=index, text="", finish_reason=FinishReason.ERROR, error=message))
        threading.Thread(target=self._restart, args=(model_id, runner.name, reason), name="engine-restart").start()

    def _restart(self, model_id: str, name: str, reason: str) -> None:
        threads.enter_helper_thread()
        restarted = False
        try:
            self.residency.acquire(model_id)
            self.residency.release(model_id)
            restarted = True
            log.warning("engine for %s restarted after a crash (%s)", name, reason)
        except Exception:  # the next request loads it again and reports why
            log.exception("restarting the engine for %s failed", name)
        finally:
            with self._crash_lock:
                self._restarting.discard(model_id)
                self.restarts += restarted
        if self.on_restart is not None:
            self.on_restart(name, reason, restarted)


def _unload(runner: Runner) -> None:
    runner.close()
    del runner
    gc.collect()
