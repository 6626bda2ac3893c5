"""What ``/v1/admin/cluster`` shows: the cluster's nodes and the platform's replicas (no Ray here,
so the API imports it whether or not Ray is installed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class NodeView:
    node_id: str
    address: str
    alive: bool
    resources: dict[str, float]
    """Ray's totals of the node: CPU, GPU, memory (bytes), object_store_memory (bytes)."""

    def public(self) -> dict[str, Any]:
        return {
            "object": "cluster.node",
            "id": self.node_id,
            "address": self.address,
            "alive": self.alive,
            "resources": self.resources,
        }


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    model: str
    """The name of the model whose runner it holds."""
    node_id: str
    queue_depth: int
    adapters: list[str]
    state: str
    """``starting`` (loading its model) or ``ready``; a replica whose actor died is dropped at once."""
    pid: int | None = None
    """Its process on its node (None until it is ready)."""
    running_requests: int | None = None
    """The requests its engine holds, as it reports them (None: it did not answer in time)."""

    def public(self) -> dict[str, Any]:
        return {
            "object": "cluster.replica",
            "id": self.replica_id,
            "model": self.model,
            "node_id": self.node_id,
            "queue_depth": self.queue_depth,
            "adapters": self.adapters,
            "state": self.state,
            "pid": self.pid,
            "running_requests": self.running_requests,
        }


@dataclass(frozen=True)
class ClusterView:
    address: str
    nodes: list[NodeView]
    replicas: list[ReplicaView]

    def public(self) -> dict[str, Any]:
        return {
            "object": "cluster",
            "address": self.address,
            "nodes": {"object": "list", "data": [n.public() for n in self.nodes]},
            "replicas": {"object": "list", "data": [r.public() for r in self.replicas]},
        }


@runtime_checkable
class ClusterEngine(Protocol):
    """An engine whose replicas run across a cluster."""

    async def cluster_view(self) -> ClusterView: ...
