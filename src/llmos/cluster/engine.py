"""``EngineClient`` over engine replicas on a Ray cluster.

The API server keeps what is cheap and per request: resolving references, tokenising, compiling
grammars (a ``LocalEngine`` that never loads a runner). The work goes to replicas (``pool``): a
generation streams its deltas back from the replica's actor, a client that leaves aborts the
request there (its row is freed), and a replica that dies ends the requests it held with an error
and is replaced while the next requests go to the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError

from llmos.cluster.connect import ClusterSession, connect, disconnect
from llmos.cluster.pool import Replica, ReplicaPool
from llmos.cluster.routing import ReplicaNeed
from llmos.cluster.scaling import Autoscaler
from llmos.cluster.view import ClusterView
from llmos.cluster.wire import to_wire
from llmos.config import Settings
from llmos.engine.grammar import CompiledGrammar
from llmos.engine.local import LocalEngine
from llmos.engine.models import resolution
from llmos.engine.protocol import (
    ClassificationResult,
    EmbeddingResult,
    EntityResult,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    GrammarSpec,
    ModelHandle,
    PairScores,
)
from llmos.engine.vllm_backend.capability import GENERATING_TASKS
from llmos.errors import EngineError, LLMOSError, ReplicaStopping, ServiceUnavailableError
from llmos.registry import ModelRegistry

PING_TIMEOUT_S = 10.0
"""A replica that does not answer a ping in this long after a failed call is taken for dead."""

STOPPING_RETRIES = 2
"""A request that reaches a replica another server is scaling down is routed again this often."""


class RayEngine:
    """Implements ``EngineClient`` (and ``view.ClusterEngine``) with replicas on a Ray cluster."""

    def __init__(self, registry: ModelRegistry, settings: Settings, *, local: LocalEngine) -> None:
        self.settings = settings
        self.local = local
        self.session: ClusterSession = connect(settings)
        self.pool = ReplicaPool(settings, self._need_of, self._name_of)
        self.scaler = Autoscaler(self.pool, settings)
        self._pending = 0
        self._inflight: dict[str, Replica] = {}  # request id -> the replica generating it

    def _need_of(self, model_key: str) -> ReplicaNeed:
        """A replica's reservation: ``ray_replica_cpus``, its backend's memory estimate, and
        ``ray_replica_gpus`` for a generating model, the only kind a GPU backend (vLLM) serves."""
        record, backend = self.local.models.served(model_key)
        gpus = self.settings.ray_replica_gpus if record.task in GENERATING_TASKS else 0.0
        return ReplicaNeed(cpus=self.settings.ray_replica_cpus, memory_bytes=backend.estimate_bytes(record), gpus=gpus)

    def _name_of(self, model_id: str) -> str:
        return self.local.models.names.get(model_id, model_id)

    # -- the API server's own part ---------------------------------------------------------
    async def resolve(self, model: str) -> ModelHandle:
        return await self.local.resolve(model)

    async def encode_chat(
        self, model: ModelHandle, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return await self.local.encode_chat(model, messages, tools)

    async def compile_grammar(self, model: ModelHandle, spec: GrammarSpec, *, param: str) -> CompiledGrammar:
        return await self.local.compile_grammar(model, spec, param=param)

    async def encode_text(self, model: ModelHandle, text: str) -> list[int]:
        return await self.local.encode_text(model, text)

    def check_capacity(self) -> None:
        if self._pending >= self.settings.max_pending_requests:
            raise ServiceUnavailableError("the server is at capacity; retry shortly", retry_after=1.0)

    # -- work on replicas ------------------------------------------------------------------
    async def _route(self, model: ModelHandle) -> Replica:
        served = resolution(model)
        adapter = served.record.id if served.record is not served.base else None
        self.check_capacity()
        self._pending += 1
        try:
            replica = await self.pool.route(served.key, adapter)
        except BaseException:
            self._pending -= 1
            raise
        replica.mine += 1
        self.scaler.observe(served.key)
        return replica

    def _done(self, replica: Replica) -> None:
        replica.mine -= 1
        self._pending -= 1

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        handle = request.handle or await self.resolve(request.model)
        for attempt in range(STOPPING_RETRIES + 1):
            replica = await self._route(handle)
            try:
                async for delta in self._generate_on(replica, request, handle):
                    yield delta
                return
            except ReplicaStopping:  # another server scaled it down as this request was sent
                if attempt == STOPPING_RETRIES:
                    raise

    async def _generate_on(
        self, replica: Replica, request: GenerationRequest, handle: ModelHandle
    ) -> AsyncGenerator[GenerationDelta, None]:
        """The request's deltas from ``replica``, to which ``_route`` sent it."""
        finished: set[int] = set()
        self._inflight[request.request_id] = replica
        stream = replica.actor.generate.options(num_returns="streaming").remote(
            to_wire(request, resolution(handle).record.id), self.pool.server_id
        )
        try:
            try:
                async for ref in stream:
                    item = await ref
                    if isinstance(item, LLMOSError):
                        if isinstance(item, ReplicaStopping):
                            replica.stopping = True  # routed again by ``generate``
                        raise item
                    if item.finish_reason is not None:
                        finished.add(item.index)
                    yield item
                    if len(finished) == request.params.n:
                        break
            except RayError as exc:
                where = f"the engine replica serving this request on {replica.node.address}"
                if await self._lost(replica, exc):
                    message = f"{where} died; retry: new requests go to the other replicas"
                else:
                    message = f"{where} failed ({type(exc).__name__}); retry"
                for index in range(request.params.n):
                    if index not in finished:
                        finished.add(index)
                        yield GenerationDelta(index=index, text="", finish_reason=FinishReason.ERROR, error=message)
        finally:
            stopping = replica.stopping
            if len(finished) < request.params.n and replica.state == "ready" and not stopping:
                replica.actor.abort.remote(request.request_id)  # client gone or consumer stopped early
            self._inflight.pop(request.request_id, None)
            self._done(replica)

    async def _lost(self, replica: Replica, exc: RayError) -> bool:
        """Whether ``exc`` means ``replica`` is gone (then the pool drops and replaces it): Ray says
        so, or it does not answer a ping (a lost object may hide a dead process)."""
        if not isinstance(exc, RayActorError):
            try:
                await asyncio.wait_for(replica.actor.pid.remote(), PING_TIMEOUT_S)
                return False
            except (RayError, TimeoutError) as ping:
                exc = ping if isinstance(ping, RayError) else exc
        self.pool.lost(replica, exc)
        return True

    async def _call(self, model: ModelHandle, method: str, *args: Any, **kwargs: Any) -> Any:
        for attempt in range(STOPPING_RETRIES + 1):
            result = await self._call_once(model, method, *args, **kwargs)
            if not isinstance(result, ReplicaStopping) or attempt == STOPPING_RETRIES:
                break
        if isinstance(result, LLMOSError):
            raise result
        return result

    async def _call_once(self, model: ModelHandle, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method``'s result on the replica ``_route`` chooses, or the platform error it returned."""
        replica = await self._route(model)
        try:
            result = await replica.actor.call.remote(
                method, self.pool.server_id, resolution(model).record.id, *args, **kwargs
            )
        except RayError as exc:
            if await self._lost(replica, exc):
                raise ServiceUnavailableError(
                    f"the engine replica serving this request on {replica.node.address} died; retry shortly"
                ) from exc
            raise EngineError(f"the engine replica failed this request ({type(exc).__name__})") from exc
        finally:
            self._done(replica)
        if isinstance(result, ReplicaStopping):
            replica.stopping = True
        return result

    async def embed(self, model: ModelHandle, inputs: list[str] | list[list[int]]) -> EmbeddingResult:
        result: EmbeddingResult = await self._call(model, "embed", inputs)
        return result

    async def classify(self, model: ModelHandle, inputs: list[str]) -> ClassificationResult:
        result: ClassificationResult = await self._call(model, "classify", inputs)
        return result

    async def extract_entities(self, model: ModelHandle, inputs: list[str]) -> EntityResult:
        result: EntityResult = await self._call(model, "extract_entities", inputs)
        return result

    async def score_pairs(
        self, model: ModelHandle, pairs: list[tuple[str, str]], *, tenant: str, truncate: bool = False
    ) -> PairScores:
        result: PairScores = await self._call(model, "score_pairs", pairs, tenant=tenant, truncate=truncate)
        return result

    async def abort(self, request_id: str) -> None:
        replica = self._inflight.get(request_id)
        if replica is not None and replica.state == "ready":
            await replica.actor.abort.remote(request_id)

    # -- operating it ----------------------------------------------------------------------
    async def load(self, model: ModelHandle, *, pin: bool) -> None:
        served = resolution(model)
        await self.pool.ensure(served.key)
        replicas = self.pool.ready(served.key)
        await asyncio.gather(*(r.actor.load.remote(served.record.id, pin) for r in replicas))

    async def unload(self, model_id: str) -> None:
        await self.pool.retire(model_id)
        self.pool.forget_adapter(model_id)
        for replica in self.pool.replicas:
            replica.actor.unload.remote(model_id)  # an adapter of their base: forgotten there too
        await self.local.unload(model_id)

    def stats(self) -> dict[str, Any]:
        """This server's own counts, and each replica with its engine's latest report (its
        ``models``, read every ``metrics_sample_interval_s``) and the requests this server has in
        flight on it: the metrics sampler exports them per replica and summed per model."""
        replicas = [  # a copy: the sampler's thread reads while the event loop places and drops
            {
                **self.pool.view(r).public(),
                "node_address": r.node.address,
                "server_in_flight": r.mine,
                "models": r.report.get("models", {}),
            }
            for r in list(self.pool.replicas)
        ]
        return {
            "pending_requests": self._pending,
            "engine_restarts": self.pool.replaced,
            "cluster": self.session.address,
            "replicas": replicas,
            "models": {},
        }

    async def cluster_view(self) -> ClusterView:
        await self.pool.refresh()
        nodes = await asyncio.to_thread(self.pool.nodes)
        server_node = ray.get_runtime_context().get_node_id()
        replicas = [self.pool.view(r) for r in self.pool.replicas]
        return ClusterView(self.session.address, nodes, replicas, server_node=server_node)

    async def check_health(self) -> None:
        await self.local.check_health()

    async def shutdown(self) -> None:
        self.scaler.close()
        self.pool.close(stop_replicas=self.session.started_head)
        await self.local.shutdown()
        await asyncio.to_thread(disconnect)
