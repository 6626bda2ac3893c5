"""Which replica serves a request, and which node a new replica or a training job goes to: pure decisions.

Each API server routes its requests itself, by each replica's requests in flight from every
server: its own counted exactly, the other servers' as the replica last reported them (ADR 0038).
These functions take plain views and are tested without Ray.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

POLL_S = 1.0
"""How often a server asks the replicas for their loads (and looks for replicas other servers
placed): the other servers' share of a replica's load is at most this old when routed by."""


@dataclass(frozen=True)
class ReplicaLoad:
    """A live replica as the router sees it."""

    replica_id: str
    queue_depth: int
    """Requests sent to it and not finished, by every server."""
    adapters: frozenset[str] = frozenset()
    """Adapter model ids it has been asked to serve (so it holds them, unless it evicted them since)."""


def choose_replica(replicas: Sequence[ReplicaLoad], adapter: str | None, *, overload: int) -> ReplicaLoad:
    """Ray Serve LLM's multiplexing rule: a request for ``adapter`` goes to the least busy replica
    that already holds it, unless every such replica has ``overload`` requests in flight; otherwise
    (and for the base model) to the least busy replica of all. Ties go to the first listed."""
    if not replicas:
        raise ValueError("no replica to choose from")
    if adapter is not None:
        holders = [r for r in replicas if adapter in r.adapters and r.queue_depth < overload]
        if holders:
            return min(holders, key=lambda r: r.queue_depth)
    return min(replicas, key=lambda r: r.queue_depth)


@dataclass(frozen=True)
class NodeCapacity:
    """A cluster node's resources as Ray reports them (CPUs, bytes of memory, GPUs)."""

    node_id: str
    address: str
    cpus: float
    memory_bytes: int
    gpus: float = 0.0


@dataclass(frozen=True)
class ReplicaNeed:
    """What an engine replica (or a training job's worker) reserves on its node."""

    cpus: float
    memory_bytes: int
    gpus: float = 0.0


@dataclass
class Reservation:
    """What the platform's replicas already hold on one node."""

    cpus: float = 0.0
    memory_bytes: int = 0
    gpus: float = 0.0
    models: list[str] = field(default_factory=list)
    """The model of each replica placed there (a model may have several)."""


def choose_node(
    nodes: Sequence[NodeCapacity], held: dict[str, Reservation], need: ReplicaNeed, model: str
) -> NodeCapacity | None:
    """The node a new replica of ``model`` goes to: among the nodes with room left for ``need``
    (after what ``held`` reserves), the one with the fewest replicas of this model (so replicas of
    one model spread across nodes), then the most free memory. None: no node has room."""

    def free(node: NodeCapacity) -> tuple[float, int, float]:
        r = held.get(node.node_id, Reservation())
        return node.cpus - r.cpus, node.memory_bytes - r.memory_bytes, node.gpus - r.gpus

    fitting = []
    for node in nodes:
        cpus, memory, gpus = free(node)
        if cpus >= need.cpus and memory >= need.memory_bytes and gpus >= need.gpus:
            fitting.append(node)
    if not fitting:
        return None
    return min(fitting, key=lambda n: (held.get(n.node_id, Reservation()).models.count(model), -free(n)[1]))


def choose_job_node(free: Sequence[NodeCapacity], need: ReplicaNeed, server_node: str) -> NodeCapacity | None:
    """The node a training job's worker goes to. ``free``: the alive nodes with what nothing has
    reserved of them yet. Among those with room for ``need``, a node other than the API server's
    own (its cores answer the requests), then the most free CPUs, then the most free memory. None:
    no node has room, and the job waits in the queue."""
    fitting = [n for n in free if n.cpus >= need.cpus and n.memory_bytes >= need.memory_bytes and n.gpus >= need.gpus]
    if not fitting:
        return None
    return min(fitting, key=lambda n: (n.node_id == server_node, -n.cpus, -n.memory_bytes))


def replicas_wanted(queue_depths: Sequence[int], *, target: int, minimum: int, maximum: int) -> int:
    """How many replicas a model's load asks for (Ray Serve's autoscaling rule): the requests in
    flight over all its replicas divided by ``target`` per replica, rounded up, within
    [``minimum``, ``maximum``]."""
    in_flight = sum(queue_depths)
    return max(minimum, min(maximum, -(-in_flight // target)))
