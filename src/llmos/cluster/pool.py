"""The engine replicas of each model: placed on the cluster's nodes, routed to, replaced when they die.

A model gets ``ray_min_replicas`` replicas on its first request. Each is placed by
``routing.choose_node`` on a node with room for its reservation (``ray_replica_cpus`` CPUs and the
memory the backend estimates for the model, the figure the memory manager budgets by), pinned
there with Ray's node affinity, and loads its model before it takes requests. A replica whose
actor dies is dropped at once (the requests it held end with an error) and a new one is placed.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray._private import state as ray_state
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llmos.cluster.replica import EngineReplica
from llmos.cluster.routing import (
    NodeCapacity,
    ReplicaLoad,
    ReplicaNeed,
    Reservation,
    choose_node,
    choose_replica,
)
from llmos.cluster.view import EngineCounts, NodeView, ReplicaView
from llmos.config import Settings
from llmos.errors import ServiceUnavailableError

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 5.0
"""A replica busy loading or dying is shown without its own counts rather than holding the view."""

REPLICA_START_TIMEOUT_S = 600.0
"""A replica loads its model before it is routed to; a large model on a slow disk takes minutes."""


@dataclass(eq=False)
class Replica:
    replica_id: str
    model_key: str
    """The residency key of the runner it holds (the base model's id)."""
    actor: Any
    node: NodeCapacity
    need: ReplicaNeed
    queue_depth: int = 0
    adapters: set[str] = field(default_factory=set)
    state: str = "starting"
    pid: int | None = None
    report: dict[str, Any] = field(default_factory=dict)
    """Its engine's latest ``stats()`` (``refresh``); empty until it answers, and when it last did not."""

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(self.replica_id, self.queue_depth, frozenset(self.adapters))


class ReplicaPool:
    def __init__(
        self, settings: Settings, need_of: Callable[[str], ReplicaNeed], name_of: Callable[[str], str]
    ) -> None:
        """``need_of(model_key)``: what a replica of that model reserves; ``name_of``: its name, for views."""
        self.settings = settings
        self.need_of = need_of
        self.name_of = name_of
        self.replicas: list[Replica] = []
        self.replaced = 0
        self._starting: dict[str, asyncio.Lock] = {}
        self._watching: asyncio.Task[None] | None = None
        self._actor_class = ray.remote(EngineReplica)

    def ready(self, model_key: str) -> list[Replica]:
        return [r for r in self.replicas if r.model_key == model_key and r.state == "ready"]

    def live(self, model_key: str) -> list[Replica]:
        """Its replicas that are ready or starting."""
        return [r for r in self.replicas if r.model_key == model_key]

    async def route(self, model_key: str, adapter: str | None) -> Replica:
        """The replica a request for ``model_key`` (and ``adapter`` on it) goes to, starting the
        model's replicas first if it has none ready."""
        ready = self.ready(model_key)
        if not ready:
            await self.ensure(model_key)
            ready = self.ready(model_key)
            if not ready:
                raise ServiceUnavailableError(f"no engine replica of {self.name_of(model_key)} is ready; retry shortly")
        chosen = choose_replica([r.load() for r in ready], adapter, overload=self.settings.ray_adapter_queue_limit)
        replica = next(r for r in ready if r.replica_id == chosen.replica_id)
        if adapter is not None:
            replica.adapters.add(adapter)
        return replica

    async def ensure(self, model_key: str, wanted: int | None = None) -> None:
        """Start replicas of ``model_key`` until it has ``wanted`` (default ``ray_min_replicas``);
        one model's starts are serialised."""
        lock = self._starting.setdefault(model_key, asyncio.Lock())
        async with lock:
            missing = (wanted or self.settings.ray_min_replicas) - len(self.live(model_key))
            capacity = await asyncio.to_thread(self.nodes_capacity) if missing > 0 else []
            placed: list[Replica] = []
            failures: list[BaseException] = []
            for _ in range(missing):
                try:
                    placed.append(self._place(model_key, capacity))
                except ServiceUnavailableError as exc:  # no room for more: start those that fit
                    failures.append(exc)
                    break
            results = await asyncio.gather(*(self._start(r) for r in placed), return_exceptions=True)
        failures += [r for r in results if isinstance(r, BaseException)]
        if failures and not self.ready(model_key):
            raise failures[0]

    def _place(self, model_key: str, capacity: list[NodeCapacity]) -> Replica:
        need = self.need_of(model_key)
        node = choose_node(capacity, self._held(), need, model_key)
        if node is None:
            raise ServiceUnavailableError(
                f"no node of the Ray cluster has room for a replica of {self.name_of(model_key)} "
                f"({need.cpus:g} CPUs, {need.memory_bytes >> 20} MB)",
                retry_after=30.0,
            )
        actor = self._actor_class.options(
            num_cpus=need.cpus,
            num_gpus=need.gpus,
            memory=max(1, need.memory_bytes),
            scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
            max_restarts=0,  # a dead replica is replaced by the pool, which knows what it held
            namespace="llmos",
        ).remote(self.settings)
        replica = Replica(f"replica-{uuid.uuid4().hex[:12]}", model_key, actor, node, need)
        self.replicas.append(replica)  # its reservation counts from now on
        return replica

    async def _start(self, replica: Replica) -> None:
        try:
            await asyncio.wait_for(replica.actor.load.remote(replica.model_key, False), REPLICA_START_TIMEOUT_S)
            replica.pid = await replica.actor.pid.remote()
        except BaseException:
            log.exception("engine replica %s of %s failed to start", replica.replica_id, replica.model_key)
            self._drop(replica)
            raise
        replica.state = "ready"
        if self._watching is None:  # from the first replica on: there is nothing to read before
            self._watching = asyncio.get_running_loop().create_task(self.watch(self.settings.metrics_sample_interval_s))
        log.info(
            "engine replica %s of %s ready on node %s", replica.replica_id, replica.model_key, replica.node.address
        )

    def lost(self, replica: Replica, reason: BaseException) -> None:
        """``replica``'s actor died: stop routing to it and place a replacement in the background."""
        if replica.state == "dead":
            return
        log.error("engine replica %s on %s died (%s); replacing it", replica.replica_id, replica.node.address, reason)
        self._drop(replica)
        self.replaced += 1
        asyncio.get_running_loop().create_task(self._replace(replica.model_key))

    async def _replace(self, model_key: str) -> None:
        try:
            await self.ensure(model_key)
        except Exception:
            log.exception("replacing an engine replica of %s failed; the next request tries again", model_key)

    def stop(self, replica: Replica) -> None:
        """Stop an idle replica the model no longer needs (scaling down)."""
        log.info("stopping idle engine replica %s of %s", replica.replica_id, replica.model_key)
        self._drop(replica)

    def _drop(self, replica: Replica) -> None:
        replica.state = "dead"
        if replica in self.replicas:
            self.replicas.remove(replica)
        ray.kill(replica.actor, no_restart=True)

    async def retire(self, model_key: str) -> None:
        """Stop every replica of ``model_key`` (the model was unloaded)."""
        for replica in [r for r in self.replicas if r.model_key == model_key]:
            self._drop(replica)

    def forget_adapter(self, adapter: str) -> None:
        for replica in self.replicas:
            replica.adapters.discard(adapter)

    def _held(self) -> dict[str, Reservation]:
        held: dict[str, Reservation] = {}
        for r in self.replicas:
            reservation = held.setdefault(r.node.node_id, Reservation())
            reservation.cpus += r.need.cpus
            reservation.memory_bytes += r.need.memory_bytes
            reservation.gpus += r.need.gpus
            reservation.models.append(r.model_key)
        return held

    def nodes(self) -> list[NodeView]:
        return cluster_nodes()

    def nodes_capacity(self) -> list[NodeCapacity]:
        return [
            NodeCapacity(
                n.node_id,
                n.address,
                cpus=n.resources.get("CPU", 0.0),
                memory_bytes=int(n.resources.get("memory", 0)),
                gpus=n.resources.get("GPU", 0.0),
            )
            for n in self.nodes()
            if n.alive
        ]

    async def refresh(self) -> None:
        """Ask each ready replica's engine for its stats (those that answer within ``STATS_TIMEOUT_S``;
        the others keep no report until they do)."""
        ready = [r for r in self.replicas if r.state == "ready"]
        replies = await asyncio.gather(
            *(asyncio.wait_for(r.actor.stats.remote(), STATS_TIMEOUT_S) for r in ready), return_exceptions=True
        )
        for replica, reply in zip(ready, replies, strict=True):
            replica.report = reply if isinstance(reply, dict) else {}

    async def watch(self, interval_s: float) -> None:
        """``refresh`` every ``interval_s`` (the metrics sampler reads the reports), until cancelled."""
        while True:
            try:
                await self.refresh()
            except Exception:  # a failed round must not end the reports
                log.exception("reading the engine replicas' stats failed")
            await asyncio.sleep(interval_s)

    def view(self, r: Replica) -> ReplicaView:
        """``r`` with its engine's counts as of the last ``refresh``."""
        return ReplicaView(
            r.replica_id,
            self.name_of(r.model_key),
            r.node.node_id,
            r.queue_depth,
            sorted(self.name_of(a) for a in set(r.adapters)),  # copied at once: the loop's thread changes it
            r.state,
            r.pid,
            EngineCounts.of(r.report) if r.report else None,
        )

    def close(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
        for replica in list(self.replicas):
            self._drop(replica)


def cluster_nodes() -> list[NodeView]:
    """The cluster's nodes as Ray's head reports them, with what Ray has not reserved of each
    (calls to its GCS; the per-node figures are Ray's developer API, which Ray Serve's own
    scheduler reads)."""
    available = ray_state.available_resources_per_node()
    views = []
    for node in ray.nodes():
        free = available.get(node["NodeID"])
        views.append(
            NodeView(
                node["NodeID"],
                node.get("NodeManagerAddress", ""),
                bool(node.get("Alive")),
                _amounts(node.get("Resources", {})),
                _amounts(free) if free is not None else None,
            )
        )
    return views


def _amounts(resources: dict[str, Any]) -> dict[str, float]:
    """Ray's resources without the one per node that only names it (``node:<address>``)."""
    return {k: float(v) for k, v in resources.items() if not k.startswith("node:")}
