"""Engine replicas that reserve the GPUs they use (issue 21, docs/scaling.md "GPUs for replicas"),
without Ray: a generating model's replica asks for ``ray_replica_gpus``, other models' for none; a
replica's actor is made with Ray's ``num_gpus`` and, when that is 0, an empty
``CUDA_VISIBLE_DEVICES`` so that it sees no GPU; a replica goes only to a node with its GPUs still
unreserved, else it is not placed, with a reason naming the GPU."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray", reason='the replica pool needs the ray extra (pip install "llmos[ray]")')

from llmos.cluster.engine import RayEngine
from llmos.cluster.pool import ReplicaPool
from llmos.cluster.routing import NodeCapacity, ReplicaNeed
from llmos.cluster.view import NodeView
from llmos.config import Settings
from llmos.errors import ServiceUnavailableError

GB = 1 << 30
CPU_NODE, GPU_NODE = "a1" * 28, "b2" * 28
"""Node ids as Ray writes them (28 bytes in hex): ``NodeAffinitySchedulingStrategy`` refuses others."""
NODES = [
    NodeCapacity(CPU_NODE, "10.0.0.1", cpus=16, memory_bytes=64 * GB),
    NodeCapacity(GPU_NODE, "10.0.0.2", cpus=4, memory_bytes=16 * GB, gpus=1.0),
]


def _engine(settings: Settings, task: str) -> RayEngine:
    """A ``RayEngine`` with only what ``_need_of`` reads (no cluster joined)."""
    engine = RayEngine.__new__(RayEngine)
    engine.settings = settings
    record = SimpleNamespace(task=task)
    backend = SimpleNamespace(estimate_bytes=lambda r: 2 * GB)
    engine.local = SimpleNamespace(models=SimpleNamespace(served=lambda key: (record, backend)))  # type: ignore[assignment]
    return engine


@pytest.mark.parametrize(
    ("task", "gpus"),
    [
        ("chat", 0.5),
        ("completion", 0.5),
        ("embedding", 0.0),
        ("sequence-classification", 0.0),
        ("token-classification", 0.0),
    ],
)
def test_only_a_generating_models_replica_asks_for_the_gpus_setting(task: str, gpus: float) -> None:
    need = _engine(Settings(ray_replica_cpus=2, ray_replica_gpus=0.5), task)._need_of("m")
    assert need == ReplicaNeed(cpus=2, memory_bytes=2 * GB, gpus=gpus)
    assert _engine(Settings(), task)._need_of("m").gpus == 0.0  # the default: no replica asks


class _ActorClass:
    """Stands for Ray's actor class: records the options each replica's actor is made with."""

    def __init__(self) -> None:
        self.options_given: list[dict[str, Any]] = []

    def options(self, **options: Any) -> _ActorClass:
        self.options_given.append(options)
        return self

    def remote(self, *args: Any) -> object:
        return object()


def _pool(need: ReplicaNeed) -> tuple[ReplicaPool, _ActorClass]:
    pool = ReplicaPool(Settings(), lambda key: need, lambda key: key)
    actors = _ActorClass()
    pool._actor_class = actors  # type: ignore[assignment]  # a fake of Ray's actor class
    return pool, actors


def test_a_replica_reserving_gpus_is_made_with_them_and_goes_to_a_node_with_them_free() -> None:
    pool, actors = _pool(ReplicaNeed(cpus=1, memory_bytes=GB, gpus=1.0))
    placed = pool._place("m", NODES, 0)
    # The CPU node has more free memory, which the rule otherwise prefers.
    assert placed.node.node_id == GPU_NODE
    options = actors.options_given[0]
    assert options["num_gpus"] == 1.0
    assert "runtime_env" not in options  # Ray sets CUDA_VISIBLE_DEVICES to the GPU it assigns
    # That GPU is now held by the first replica: a second finds no node with one free.
    with pytest.raises(ServiceUnavailableError, match=r"no node of the Ray cluster has room .*1 GPU\)"):
        pool._place("m", NODES, 1)
    assert len(pool.replicas) == 1 and len(actors.options_given) == 1


def test_what_a_jobs_worker_holds_on_a_node_is_not_offered_to_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray counts a fine-tuning job's worker as reserving its CPU, memory and GPU; the pool offers
    replicas a node's totals less that (its own replicas it subtracts itself, once)."""
    pool, _ = _pool(ReplicaNeed(cpus=1, memory_bytes=GB, gpus=1.0))
    resources = {"CPU": 4.0, "memory": 16.0 * GB, "GPU": 1.0}
    job_holds = {"CPU": 3.0, "memory": 14.0 * GB, "GPU": 0.0}  # a job's worker: 1 CPU, 2 GB and the GPU
    seen = [NodeView(GPU_NODE, "10.0.0.2", True, resources, job_holds)]
    monkeypatch.setattr(pool, "nodes", lambda: seen)
    assert pool.nodes_capacity() == [NodeCapacity(GPU_NODE, "10.0.0.2", cpus=3.0, memory_bytes=14 * GB, gpus=0.0)]
    with pytest.raises(ServiceUnavailableError, match="1 GPU"):
        pool._place("m", pool.nodes_capacity(), 0)
    # The job ends: Ray's figures are the totals again, and a replica placed there is counted once.
    seen[0] = NodeView(GPU_NODE, "10.0.0.2", True, resources, dict(resources))
    placed = pool._place("m", pool.nodes_capacity(), 0)
    seen[0] = NodeView(GPU_NODE, "10.0.0.2", True, resources, {"CPU": 3.0, "memory": 15.0 * GB, "GPU": 0.0})
    # Ray now counts the replica too: the pool offers the totals, and its node choice subtracts the replica.
    assert placed.node.node_id == GPU_NODE
    assert pool.nodes_capacity() == [NodeCapacity(GPU_NODE, "10.0.0.2", cpus=4.0, memory_bytes=16 * GB, gpus=1.0)]


def test_a_replica_reserving_no_gpu_is_made_to_see_none() -> None:
    pool, actors = _pool(ReplicaNeed(cpus=1, memory_bytes=GB))
    pool._place("m", NODES, 0)
    pool._place("m", NODES, 1)  # the second goes to the GPU node (fewest replicas of the model)
    assert [r.node.node_id for r in pool.replicas] == [CPU_NODE, GPU_NODE]
    for options in actors.options_given:
        assert options["num_gpus"] == 0
        assert options["runtime_env"] == {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}
