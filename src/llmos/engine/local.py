"""The in-process engine: registry models made resident on demand, one runner per model.

The facade over the parts: ``models`` resolves references into handles, ``backends`` says who
serves a model and what it costs, ``kernel.ModelResidency`` loads and evicts runners within the
memory budget, ``crash`` fails and restarts a dead engine loop, and the runners do the work.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
from collections.abc import AsyncGenerator, Callable
from functools import partial
from typing import Any, TypeVar

import torch

from llmos.config import Settings
from llmos.engine import threads
from llmos.engine.backends import Backends, Runner
from llmos.engine.config import EngineConfig
from llmos.engine.crash import CrashWatch, RestartHook
from llmos.engine.grammar import CompiledGrammar
from llmos.engine.models import TORCH_TWIN, ModelResolver, Resolution, encode_chat, encode_text, resolution
from llmos.engine.protocol import (
    ClassificationResult,
    EmbeddingResult,
    EntityResult,
    GenerationDelta,
    GenerationRequest,
    GrammarSpec,
    ModelHandle,
    PairScores,
)
from llmos.engine.relevance import IN_FLIGHT, relevance_by_answer
from llmos.engine.runner import GenerationRunner
from llmos.engine.torch_backend import CausalRunner, EncoderRunner
from llmos.engine.torch_backend.classifier import ClassifierRunner
from llmos.engine.torch_backend.lora import LoraWeights, load_lora
from llmos.engine.torch_backend.token_classifier import TokenClassifierRunner
from llmos.engine.vllm_backend import VllmRunner
from llmos.errors import InvalidRequestError, ServiceUnavailableError
from llmos.kernel import ModelResidency, detect_cpu
from llmos.registry import ModelRecord, ModelRegistry

R = TypeVar("R", EncoderRunner, ClassifierRunner, TokenClassifierRunner)
T = TypeVar("T")


def resolve_dtype(setting: str) -> torch.dtype:
    if setting == "auto":
        return torch.bfloat16 if detect_cpu().bf16_fast else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]


class LocalEngine:
    """Implements ``EngineClient`` in this process."""

    def __init__(
        self,
        registry: ModelRegistry,
        settings: Settings,
        *,
        on_restart: RestartHook | None = None,
        check_drafts: bool = True,
    ) -> None:
        """``on_restart(model, reason, restarted)`` is told each time a crashed engine loop has been
        restarted, or the restart failed (the platform writes it to the audit log). ``check_drafts``:
        check every ``draft_models`` pairing now (a server's start; a cluster replica leaves it to
        the loads of its own model, so that a pairing broken later stops no replica of another)."""
        self.registry = registry
        self.config = EngineConfig.from_settings(settings)
        self.dtype = resolve_dtype(self.config.dtype)
        self._helpers = threads.helper_pool()
        self.models = ModelResolver(registry, Backends(registry, self.config, self.dtype), self.dtype)
        if check_drafts:  # a pairing that cannot work stops the start
            self.models.check_drafts(dict(self.config.draft_models))
        self.residency: ModelResidency[Runner] = ModelResidency(
            self.config.memory_budget_bytes, self._load, _unload, self._estimate_size
        )
        self.crashes = CrashWatch(self.residency, on_restart)
        self._pending = 0
        self._pinned: set[str] = set()  # residency keys held by load(pin=True)

    @property
    def restarts(self) -> int:
        return self.crashes.restarts

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking ``fn`` on a helper thread, which runs torch on one core (see ``threads``)."""
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(self._helpers, partial(context.run, fn, *args))

    # -- models ----------------------------------------------------------------------------
    async def resolve(self, model: str) -> ModelHandle:
        return await self._off_loop(self.models.resolve, model)

    async def encode_chat(
        self, model: ModelHandle, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return await self._off_loop(encode_chat, model, messages, tools)

    async def compile_grammar(self, model: ModelHandle, spec: GrammarSpec, *, param: str) -> CompiledGrammar:
        def compiled() -> CompiledGrammar:
            compiler = self.models.grammars(
                model, budget=self.config.grammar_compile_budget, capacity=self.config.grammar_cache_entries
            )
            return compiler.compile(spec, param=param)

        return await self._off_loop(compiled)

    async def encode_text(self, model: ModelHandle, text: str) -> list[int]:
        return await self._off_loop(encode_text, model, text)

    # -- work ------------------------------------------------------------------------------
    def check_capacity(self) -> None:
        if self._pending >= self.config.max_pending_requests:
            raise ServiceUnavailableError("the server is at capacity; retry shortly", retry_after=1.0)

    def _admit(self) -> None:
        self.check_capacity()  # again: requests admitted at the edge may have filled it since
        self._pending += 1

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        served = resolution(request.handle or await self.resolve(request.model))
        self._admit()
        try:
            runner = await self._off_loop(self.residency.acquire, served.key)
        except BaseException:
            self._pending -= 1
            raise
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[GenerationDelta] = asyncio.Queue()
        remaining = request.params.n
        adapter: str | None = None
        try:
            if not isinstance(runner, GenerationRunner):
                raise InvalidRequestError(f"model {request.model} cannot generate text", param="model")
            runner.check_fits(request, served.virtual)
            if served.lora and isinstance(runner, CausalRunner):  # loaded beside its base, off the engine thread
                await self._off_loop(runner.lora.acquire, served.record.id, partial(self._load_adapter, served.record))
                adapter = served.record.id
            elif served.lora and isinstance(runner, VllmRunner):  # vLLM loads it at its first request
                await self._off_loop(runner.check_adapter, served.record.id)
                adapter = served.record.id

            def deliver(delta: GenerationDelta) -> None:  # called on the engine thread
                loop.call_soon_threadsafe(deltas.put_nowait, delta)

            with self.crashes.tracking(request.request_id, runner, deliver, request.params.n, request.model):
                runner.submit(request, deliver, adapter, served.virtual)
                while remaining > 0:
                    delta = await deltas.get()
                    if delta.finish_reason is not None:
                        remaining -= 1
                    yield delta
        finally:
            if remaining > 0 and isinstance(runner, GenerationRunner):
                runner.abort(request.request_id)  # client gone or consumer stopped early
            if adapter is not None and isinstance(runner, CausalRunner):
                runner.lora.release(adapter)
            self.residency.release(served.key, runner)  # a no-op if this runner crashed and was replaced
            self._pending -= 1

    def _load_adapter(self, record: ModelRecord, shapes: dict[str, tuple[int, int]]) -> LoraWeights:
        return load_lora(self.registry.model_dir(record), record.id, shapes, self.dtype)

    async def embed(self, model: ModelHandle, inputs: list[str] | list[list[int]]) -> EmbeddingResult:
        return await self._on_runner(model, "embedding", "an embedding model", EncoderRunner, lambda r: r.embed(inputs))

    async def classify(self, model: ModelHandle, inputs: list[str]) -> ClassificationResult:
        return await self._on_runner(
            model, "sequence-classification", "a classifier", ClassifierRunner, lambda r: r.classify(inputs)
        )

    async def score_pairs(
        self, model: ModelHandle, pairs: list[tuple[str, str]], *, tenant: str, truncate: bool = False
    ) -> PairScores:
        task = resolution(model).record.task
        if task == "sequence-classification":
            return await self._on_runner(
                model, task, "a cross-encoder", ClassifierRunner, lambda r: r.score_pairs(pairs, truncate=truncate)
            )
        if model.info.task in ("chat", "completion") and model.info.scores_prompts:
            # Half the engine's pending room at most: other clients' requests still get in.
            in_flight = max(1, min(IN_FLIGHT, self.config.max_pending_requests // 2))
            return await relevance_by_answer(self, model, pairs, tenant=tenant, in_flight=in_flight, truncate=truncate)
        raise InvalidRequestError(
            f"model {model.name} is a {task} model: scoring needs a cross-encoder (sequence-classification) "
            "or a chat or completion model whose backend scores prompts",
            param="model",
        )

    async def extract_entities(self, model: ModelHandle, inputs: list[str]) -> EntityResult:
        return await self._on_runner(
            model,
            "token-classification",
            "a token-classification (NER) model",
            TokenClassifierRunner,
            lambda r: r.extract(inputs),
        )

    async def _on_runner(self, model: ModelHandle, task: str, what: str, kind: type[R], work: Callable[[R], T]) -> T:
        """Run ``work`` on the resident runner of ``model`` (a ``task`` model, else 400), off the event loop."""
        served = resolution(model)
        if served.record.task != task:
            raise InvalidRequestError(f"model {model.name} is a {served.record.task} model, not {what}", param="model")
        self._admit()
        try:
            return await self._off_loop(self._use_runner, served, kind, work)
        finally:
            self._pending -= 1

    def _use_runner(self, served: Resolution, kind: type[R], work: Callable[[R], T]) -> T:
        with self.residency.use(served.key) as runner:
            assert isinstance(runner, kind)
            return work(runner)

    async def abort(self, request_id: str) -> None:
        runner = self.crashes.runner_of(request_id)
        if runner is not None:
            runner.abort(request_id)

    # -- operating it ----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        names = self.models.names
        models = {}
        sizes = self.residency.resident_bytes()
        for key in sizes:
            runner = self.residency.peek(key)
            entry: dict[str, Any] = {
                "name": names.get(key.removesuffix(TORCH_TWIN), key),
                "memory_bytes": sizes[key],
                "pinned": key in self._pinned,
            }
            if key.endswith(TORCH_TWIN):
                entry["serves"] = "adapters"  # the torch runner beside a model served by llama.cpp or vLLM
            if isinstance(runner, GenerationRunner):
                entry.update(runner.stats())
                if "adapters" in entry:
                    entry["adapters"] = [names.get(a, a) for a in entry["adapters"]]
            models[key] = entry
        return {
            "pending_requests": self._pending,
            "engine_restarts": self.crashes.restarts,
            "dtype": str(self.dtype).removeprefix("torch."),
            "memory_budget_bytes": self.residency.budget,
            "resident_bytes": self.residency.used_bytes,
            "models": models,
        }

    async def check_health(self) -> None:
        if self.crashes.restarting:
            keys = [m.removesuffix(TORCH_TWIN) for m in self.crashes.restarting]
            names = sorted(self.models.names.get(m, m) for m in keys)
            raise ServiceUnavailableError(f"the engine is restarting after a crash: {', '.join(names)}")
        await self._off_loop(self.registry.list)

    async def load(self, model: ModelHandle, *, pin: bool) -> None:
        key = resolution(model).key
        await self._off_loop(self.residency.acquire, key)
        if not pin or key in self._pinned:
            self.residency.release(key)  # resident, and evictable once idle like any other
        else:
            self._pinned.add(key)  # the acquire's use is held until unload

    async def unload(self, model_id: str) -> None:
        for key in (model_id, model_id + TORCH_TWIN):
            if key in self._pinned:
                self._pinned.discard(key)
                self.residency.release(key)
        await self._off_loop(self.residency.evict, model_id)
        await self._off_loop(self.residency.evict, model_id + TORCH_TWIN)
        for key in self.residency.resident():
            runner = self.residency.peek(key)
            if isinstance(runner, CausalRunner):
                runner.lora.evict(model_id)
                runner.virtual.evict(model_id)
        self.models.forget(model_id)

    async def shutdown(self) -> None:
        await self._off_loop(self.residency.close)

    # -- residency callbacks ---------------------------------------------------------------
    def _estimate_size(self, key: str) -> int:
        record, backend = self.models.served(key)
        return backend.estimate_bytes(record)

    def _load(self, key: str) -> Runner:
        record, backend = self.models.served(key)
        backend.draft_for(record)  # a pairing that cannot work fails the load, whichever the backend
        runner = backend.load(record)
        if isinstance(runner, GenerationRunner):  # its thread starts with its first request
            self.crashes.watch(key, runner)
        return runner


def _unload(runner: Runner) -> None:
    runner.close()
    del runner
    gc.collect()
