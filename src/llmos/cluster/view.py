"""What ``/v1/admin/cluster`` shows: the nodes, the engine replicas on them and the fine-tuning jobs
placed there, in Ray cluster mode or for this one machine in single-process mode (no Ray here, so
the API imports it whether or not Ray is installed)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

RAY_MODE = "ray"
SINGLE_PROCESS_MODE = "single-process"


@dataclass(frozen=True)
class NodeView:
    node_id: str
    address: str
    alive: bool
    resources: dict[str, float]
    """Its totals: CPU, GPU, memory (bytes), object_store_memory (bytes, Ray only)."""
    available: dict[str, float] | None = None
    """What is left of them: Ray's unreserved amounts, or this machine's free memory and idle
    cores (single-process mode). None: not known (a dead node)."""
    gpus: list[dict[str, Any]] = field(default_factory=list)
    """Each GPU's name, memory total and free, utilisation (``kernel.devices.GpuInfo``): this
    machine's in single-process mode; in Ray mode only the count, in ``resources``."""

    def public(self) -> dict[str, Any]:
        return {
            "object": "cluster.node",
            "id": self.node_id,
            "address": self.address,
            "alive": self.alive,
            "resources": self.resources,
            "available": self.available,
            "gpus": self.gpus,
        }


@dataclass(frozen=True)
class EngineCounts:
    """What an engine reports of itself (``LocalEngine.stats``), summed over its resident runners."""

    pending: int
    """Requests it holds (running, queued or being prepared)."""
    running: int
    waiting: int
    tokens_generated: int
    """Every token its current runners computed (a runner evicted and loaded again starts from 0)."""

    @classmethod
    def of(cls, stats: Mapping[str, Any]) -> EngineCounts:
        runners = list(stats.get("models", {}).values())
        return cls(
            pending=int(stats.get("pending_requests", 0)),
            running=sum(int(r.get("requests_running", 0)) for r in runners),
            waiting=sum(int(r.get("requests_waiting", 0)) for r in runners),
            tokens_generated=sum(int(r.get("tokens_generated", 0)) for r in runners),
        )


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    model: str
    """The name of the model whose runner it holds."""
    node_id: str
    queue_depth: int | None
    """Requests in flight on it from every API server of the cluster (None in single-process mode)."""
    adapters: list[str]
    state: str
    """``starting`` (loading its model) or ``ready``; a replica whose actor died is dropped at once."""
    pid: int | None = None
    """Its process on its node (None until it is ready)."""
    counts: EngineCounts | None = None
    """Its engine's own counts (None: it did not answer in time)."""

    def public(self) -> dict[str, Any]:
        counts = self.counts
        return {
            "object": "cluster.replica",
            "id": self.replica_id,
            "model": self.model,
            "node_id": self.node_id,
            "queue_depth": self.queue_depth,
            "adapters": self.adapters,
            "state": self.state,
            "pid": self.pid,
            "running_requests": counts.pending if counts else None,
            "requests_running": counts.running if counts else None,
            "requests_waiting": counts.waiting if counts else None,
            "tokens_generated": counts.tokens_generated if counts else None,
        }


@dataclass(frozen=True)
class JobView:
    """A running fine-tuning job and the node its worker process runs on (in Ray cluster mode, the
    node the job was placed on; else the API server's own)."""

    job_id: str
    model: str
    tenant: str
    status: str
    node_id: str
    memory_bytes: int = 0
    """The memory its worker reserves on its node (0: none, a child of the API server)."""
    gpus: float = 0.0
    """The GPUs its worker reserves there (0: none; a child of the API server reserves none)."""

    def public(self) -> dict[str, Any]:
        return {
            "object": "cluster.job",
            "id": self.job_id,
            "model": self.model,
            "tenant": self.tenant,
            "status": self.status,
            "node_id": self.node_id,
            "memory_bytes": self.memory_bytes,
            "gpus": self.gpus,
        }


@dataclass(frozen=True)
class ClusterView:
    address: str | None
    """The Ray cluster's GCS address (None in single-process mode)."""
    nodes: list[NodeView]
    replicas: list[ReplicaView]
    server_node: str
    """The node this API server runs on (and, without Ray, the fine-tuning workers it starts)."""
    mode: str = RAY_MODE
    jobs: list[JobView] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {
            "object": "cluster",
            "mode": self.mode,
            "address": self.address,
            "server_node_id": self.server_node,
            "nodes": {"object": "list", "data": [n.public() for n in self.nodes]},
            "replicas": {"object": "list", "data": [r.public() for r in self.replicas]},
            "jobs": {"object": "list", "data": [j.public() for j in self.jobs]},
        }


@runtime_checkable
class ClusterEngine(Protocol):
    """An engine whose replicas run across a cluster."""

    async def cluster_view(self) -> ClusterView: ...
