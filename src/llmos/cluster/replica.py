"""An engine replica: a Ray actor holding the in-process engine for the models routed to it.

The actor's process is a small serving process of its own: it opens the registry from the
server's settings (the same database and artifact store), builds a ``LocalEngine`` and serves the
engine protocol to the API server. Generation streams each ``GenerationDelta`` as it comes (a Ray
streaming generator); ``abort`` reaches the engine's scheduler, which frees the request's row.
The platform's own errors (at capacity, a prompt that can never fit, a wrong task) come back as
values and are raised again on the API server with their status and code intact.

Every API server of the cluster may route to a replica (ADR 0038), so the replica counts its own
requests in flight, per server, and the adapters it has been asked for, and reports them
(``report_load``); the servers route by those counts. Its actor is detached (a server that stops
does not take it down), so it ends itself once it is loaded, no server has asked for its load in
``LEASE_S`` and it holds no request. A server that scales it down or unloads its model does not
kill it either: it reports itself stopping and ends itself ``STOP_GRACE_S`` later, so every
server polls it as stopping first and forgets it instead of replacing it as crashed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from llmos.cluster.routing import POLL_S
from llmos.cluster.wire import ReplicaRequest
from llmos.config import Settings
from llmos.engine.local import LocalEngine
from llmos.engine.process import configure_process
from llmos.engine.protocol import GenerationDelta
from llmos.errors import LLMOSError, ReplicaStopping
from llmos.platform import open_registry

CALLS = frozenset({"embed", "classify", "extract_entities", "score_pairs"})
"""The engine's one-shot calls a replica serves (besides generation)."""

LEASE_S = 60.0
"""A replica no API server has polled for this long (every server polls the replicas it routes to
each ``routing.POLL_S``) and that holds no request stops itself: its servers are gone."""

STOP_GRACE_S = 3 * POLL_S
"""A replica being stopped reports so for this long before it ends itself: at least two polls of
every server, which then forget it rather than take its end for a crash and replace it."""


class ReplicaLedger:
    """What an engine replica reports to the API servers that route to it: its identity, the
    requests it holds by the server that sent them, the adapters it has been asked for, whether
    it is loaded or being stopped, and when a server last asked (its lease)."""

    def __init__(self, replica_id: str, model_key: str, slot: int, node_id: str) -> None:
        self.replica_id = replica_id
        self.model_key = model_key
        self.slot = slot
        self.node_id = node_id
        self.ready = False
        self.stopping = False
        self.stopped_at: float | None = None
        self.in_flight: Counter[str] = Counter()
        self.adapters: set[str] = set()
        self.polled = time.monotonic()

    def admit(self, server: str, model_id: str) -> None:
        """A request from ``server`` for ``model_id`` (the base or an adapter of it) starts here."""
        if self.stopping:
            raise ReplicaStopping("this engine replica is being stopped; retry")
        self.in_flight[server] += 1
        if model_id != self.model_key:
            self.adapters.add(model_id)

    def release(self, server: str) -> None:
        self.in_flight[server] -= 1
        if self.in_flight[server] <= 0:
            del self.in_flight[server]

    def report(self) -> dict[str, Any]:
        """Asked by every server that routes here, each ``routing.POLL_S``: renews the lease."""
        self.polled = time.monotonic()
        return {
            "replica_id": self.replica_id,
            "model_key": self.model_key,
            "slot": self.slot,
            "ready": self.ready,
            "stopping": self.stopping,
            "in_flight": dict(self.in_flight),
            "adapters": sorted(self.adapters),
            "node_id": self.node_id,
            "pid": os.getpid(),
        }

    def loaded(self) -> None:
        """Its model is resident: it takes requests, and its lease runs from now."""
        self.ready = True
        self.polled = time.monotonic()

    def stop_if_idle(self) -> bool:
        """Scaling down: refuse new requests from now on if it holds none (True), so two servers
        scaling down at once cannot both stop it, nor stop it under another's request."""
        if self.stopping or self.in_flight:
            return False
        self.retire()
        return True

    def retire(self) -> None:
        """Its model was unloaded (or it was scaled down): refuse new requests and end in ``STOP_GRACE_S``."""
        if not self.stopping:
            self.stopping = True
            self.stopped_at = time.monotonic()

    def lapsed(self) -> bool:
        """Loaded, no server has asked for ``LEASE_S`` and nothing is in flight: its servers are
        gone. Never while it loads: no server polls it before (``REPLICA_START_TIMEOUT_S`` bounds that)."""
        return self.ready and time.monotonic() - self.polled > LEASE_S and not self.in_flight

    def over(self) -> bool:
        """It should end now: its lease lapsed, or it was stopped ``STOP_GRACE_S`` ago."""
        stopped = self.stopped_at is not None and time.monotonic() - self.stopped_at >= STOP_GRACE_S
        return stopped or self.lapsed()


class EngineReplica:
    """Made a Ray actor by ``ray.remote(EngineReplica)`` (``cluster.pool``), so importing this
    module needs no Ray."""

    def __init__(self, settings: Settings, replica_id: str, model_key: str, slot: int, node_id: str) -> None:
        """``node_id``: the node it was pinned to (strict node affinity), reported to the servers that find it."""
        configure_process(settings)
        self.engine = LocalEngine(open_registry(settings), settings, check_drafts=False)
        self.ledger = ReplicaLedger(replica_id, model_key, slot, node_id)
        self._lease: asyncio.Task[None] | None = None

    async def generate(self, request: ReplicaRequest, server: str) -> AsyncIterator[GenerationDelta | LLMOSError]:
        try:
            self.ledger.admit(server, request.model_id)
        except LLMOSError as exc:
            yield exc
            return
        try:
            handle = await self.engine.resolve(request.model_id)
            grammar = None
            if request.grammar is not None:
                grammar = await self.engine.compile_grammar(handle, request.grammar, param="response_format")
            local = dataclasses.replace(request.request, handle=handle, grammar=grammar)
            async for delta in self.engine.generate(local):
                yield delta
        except LLMOSError as exc:
            yield exc
        finally:
            self.ledger.release(server)

    async def call(self, method: str, server: str, model_id: str, *args: Any, **kwargs: Any) -> Any:
        """One of ``CALLS`` on ``model_id``; its result, or the platform error it raised."""
        if method not in CALLS:
            raise ValueError(f"not a replica call: {method}")
        try:
            self.ledger.admit(server, model_id)
        except LLMOSError as exc:
            return exc
        try:
            handle = await self.engine.resolve(model_id)
            return await getattr(self.engine, method)(handle, *args, **kwargs)
        except LLMOSError as exc:
            return exc
        finally:
            self.ledger.release(server)

    async def report_load(self) -> dict[str, Any]:
        return self.ledger.report()

    async def stop_if_idle(self) -> bool:
        return self.ledger.stop_if_idle()

    async def retire(self) -> None:
        self.ledger.retire()

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def load(self, model_id: str, pin: bool) -> None:
        """Make ``model_id``'s runner resident (a new replica loads its model before taking requests)."""
        if self._lease is None:
            self._lease = asyncio.get_running_loop().create_task(self._keep_lease())
        await self.engine.load(await self.engine.resolve(model_id), pin=pin)
        if not self.ledger.ready:
            self.ledger.loaded()

    async def _keep_lease(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            if self.ledger.over():
                import ray

                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    async def unload(self, model_id: str) -> None:
        await self.engine.unload(model_id)

    async def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def pid(self) -> int:
        return os.getpid()

    async def shutdown(self) -> None:
        await self.engine.shutdown()
