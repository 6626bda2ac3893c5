"""The cluster view and per-replica metrics without Ray: ``/v1/admin/cluster`` in single-process
mode (this machine, its resident models, the jobs it runs), the replica pool's reports read from
engine replicas faked at the actor boundary, and the sampler's ``llmos_replica_*`` series."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.api.admin.cluster import _jobs_here
from llmos.cluster.connect import ClusterSession
from llmos.cluster.engine import RayEngine
from llmos.cluster.machine import LOCAL_NODE, this_machine
from llmos.cluster.pool import Replica, ReplicaPool
from llmos.cluster.routing import NodeCapacity, ReplicaNeed
from llmos.config import Settings
from llmos.errors import NotFoundError
from llmos.kernel.job_status import JobStatus
from llmos.kernel.job_workers import LOCAL, Placement
from llmos.monitoring import metrics
from llmos.monitoring.sampler import MetricsSampler
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.fake_engine import FakeEngine
from tests.unit.test_console import _sign_in

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _runner(name: str, running: int, waiting: int, tokens: int) -> dict[str, Any]:
    return {"name": name, "requests_running": running, "requests_waiting": waiting, "tokens_generated": tokens}


@dataclass
class _BusyEngine(FakeEngine):
    """The in-process engine with one resident model serving two rows and queueing one."""

    def stats(self) -> dict[str, Any]:
        runner = _runner("tiny-chat", 2, 1, 40) | {"adapters": ["tiny-lora"]}
        return {"pending_requests": 3, "models": {"m-1": runner}}


def test_single_process_mode_shows_this_machine_and_its_resident_models(platform: Platform) -> None:
    with TestClient(create_app(platform=platform, engine=_BusyEngine())) as http:
        reply = http.get("/v1/admin/cluster", headers=ADMIN)
        _, secret = platform.keys.create("app", scopes=("inference", "models", "metrics"))
        refused = http.get("/v1/admin/cluster", headers={"Authorization": f"Bearer {secret}"})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert (body["object"], body["mode"], body["address"], body["server_node_id"]) == (
        "cluster",
        "single-process",
        None,
        LOCAL_NODE,
    )
    [node] = body["nodes"]["data"]
    assert (node["id"], node["alive"]) == (LOCAL_NODE, True)
    assert node["resources"]["CPU"] == os.cpu_count()
    assert 0 < node["available"]["memory"] <= node["resources"]["memory"]
    assert 0 <= node["available"]["CPU"] <= node["resources"]["CPU"]
    [replica] = body["replicas"]["data"]
    assert (replica["model"], replica["node_id"], replica["state"], replica["pid"]) == (
        "tiny-chat",
        LOCAL_NODE,
        "ready",
        os.getpid(),
    )
    assert (replica["requests_running"], replica["requests_waiting"], replica["tokens_generated"]) == (2, 1, 40)
    assert (replica["running_requests"], replica["queue_depth"], replica["adapters"]) == (3, None, ["tiny-lora"])
    assert body["jobs"] == {"object": "list", "data": []}
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "insufficient_permissions"


def test_this_machines_memory_is_read_from_the_kernel() -> None:
    node = this_machine()
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert node.resources["memory"] == pytest.approx(total, rel=0.01)


@dataclass
class _Job:
    id: str
    model: str
    tenant: str
    status: JobStatus


@dataclass
class _Jobs:
    rows: dict[str, _Job]

    def get(self, tenant: str | None, job_id: str) -> _Job:
        if job_id not in self.rows:
            raise NotFoundError(f"No such fine-tuning job: {job_id}")
        return self.rows[job_id]


@dataclass
class _Supervisor:
    placements: dict[str, Placement]


def test_each_job_this_server_runs_is_shown_on_its_node() -> None:
    """A local worker runs on the server's node, reserving nothing; a job placed on a cluster node is
    shown there with the memory and GPUs its worker reserves."""
    jobs = _Jobs(
        {
            "ftjob-1": _Job("ftjob-1", "tiny-chat", "acme", JobStatus.RUNNING),
            "ftjob-2": _Job("ftjob-2", "tiny-chat", "acme", JobStatus.RUNNING),
        }
    )
    supervisor = _Supervisor(
        {"ftjob-1": LOCAL, "ftjob-2": Placement("node-b", "10.0.0.2", 3 << 30, 1.0), "ftjob-deleted": LOCAL}
    )
    placed = _jobs_here(jobs, supervisor, "node-a")  # type: ignore[arg-type]
    assert [j.public() for j in placed] == [
        {
            "object": "cluster.job",
            "id": "ftjob-1",
            "model": "tiny-chat",
            "tenant": "acme",
            "status": "running",
            "node_id": "node-a",
            "memory_bytes": 0,
            "gpus": 0.0,
        },
        {
            "object": "cluster.job",
            "id": "ftjob-2",
            "model": "tiny-chat",
            "tenant": "acme",
            "status": "running",
            "node_id": "node-b",
            "memory_bytes": 3 << 30,
            "gpus": 1.0,
        },
    ]
    assert _jobs_here(jobs, None, "node-a") == []  # type: ignore[arg-type]


# -- the pool's reports, from replicas faked at the actor boundary -------------------------------
class _Method:
    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls = 0

    def remote(self) -> Any:
        self.calls += 1
        answer = self.answer

        async def reply() -> Any:
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return reply()


@dataclass
class _Actor:
    stats: _Method


NODE = NodeCapacity("n1", "10.0.0.1", cpus=4, memory_bytes=1 << 33)


def _pool(*replicas: Replica) -> ReplicaPool:
    pool = ReplicaPool(Settings(), lambda key: ReplicaNeed(1, 1), lambda key: {"m-1": "tiny-chat"}.get(key, key))
    pool.replicas.extend(replicas)
    return pool


def test_the_pool_reads_each_ready_replicas_own_counts() -> None:
    answering = _Actor(_Method({"pending_requests": 3, "models": {"m-1": _runner("tiny-chat", 2, 1, 17)}}))
    failing = _Actor(_Method(RuntimeError("the actor died")))
    starting = _Actor(_Method({"pending_requests": 0, "models": {}}))
    pool = _pool(
        Replica("r-a", "m-1", answering, NODE, ReplicaNeed(1, 1), mine=3, state="ready"),
        Replica("r-b", "m-1", failing, NODE, ReplicaNeed(1, 1), state="ready"),
        Replica("r-c", "m-1", starting, NODE, ReplicaNeed(1, 1)),
    )
    asyncio.run(pool.refresh())
    views = {r.replica_id: r.public() for r in map(pool.view, pool.replicas)}
    assert (views["r-a"]["requests_running"], views["r-a"]["requests_waiting"]) == (2, 1)
    assert (views["r-a"]["tokens_generated"], views["r-a"]["running_requests"], views["r-a"]["queue_depth"]) == (
        17,
        3,
        3,
    )
    assert views["r-a"]["model"] == "tiny-chat"
    assert views["r-b"]["requests_running"] is None  # did not answer: no counts rather than stale ones
    assert starting.stats.calls == 0  # a replica still loading is not asked
    assert views["r-c"]["requests_running"] is None


# -- the sampler's per-replica series ------------------------------------------------------------
def _replica(replica_id: str, node: str, running: int, waiting: int, tokens: int) -> dict[str, Any]:
    return {
        "id": replica_id,
        "node_address": node,
        "models": {"m-1": _runner("cluster-chat", running, waiting, tokens)},
    }


def _value(name: str, **labels: str) -> float | None:
    return metrics.REGISTRY.get_sample_value(name, labels)


def test_each_replica_gets_its_own_series_and_the_model_gauges_sum_them() -> None:
    stats: dict[str, Any] = {"models": {}, "replicas": []}
    sampler = MetricsSampler(lambda: stats, None, 5.0)
    a = {"model_name": "cluster-chat", "replica": "replica-a", "node": "10.0.0.1"}
    b = {"model_name": "cluster-chat", "replica": "replica-b", "node": "10.0.0.2"}
    stats["replicas"] = [_replica("replica-a", "10.0.0.1", 2, 1, 30), _replica("replica-b", "10.0.0.2", 1, 0, 12)]
    sampler.sample()
    assert _value("llmos_replica_num_requests_running", **a) == 2
    assert _value("llmos_replica_num_requests_waiting", **a) == 1
    assert _value("llmos_replica_num_requests_running", **b) == 1
    assert _value("llmos_replica_generation_tokens_total", **a) == 30
    assert _value("llmos_replica_generation_tokens_total", **b) == 12
    assert _value("llmos_num_requests_running", model_name="cluster-chat") == 3  # the model: both replicas
    assert _value("llmos_num_requests_waiting", model_name="cluster-chat") == 1

    # replica-a generated 5 more; replica-b was lost and a replacement started from zero.
    stats["replicas"] = [_replica("replica-a", "10.0.0.1", 0, 0, 35), _replica("replica-c", "10.0.0.2", 1, 0, 4)]
    sampler.sample()
    assert _value("llmos_replica_generation_tokens_total", **a) == 35
    assert _value("llmos_replica_generation_tokens_total", **b) is None  # its series went with it
    assert _value("llmos_replica_num_requests_running", **b) is None
    assert _value("llmos_replica_generation_tokens_total", **(b | {"replica": "replica-c"})) == 4

    stats["replicas"] = []
    sampler.sample()
    assert _value("llmos_replica_num_requests_running", **a) is None
    assert _value("llmos_num_requests_running", model_name="cluster-chat") is None


def test_a_ray_engines_stats_carry_each_replicas_report_to_the_metrics() -> None:
    report = {"pending_requests": 1, "models": {"m-1": _runner("tiny-chat", 1, 0, 21)}}
    pool = _pool(Replica("replica-z", "m-1", _Actor(_Method(report)), NODE, ReplicaNeed(1, 1), state="ready"))
    engine = RayEngine.__new__(RayEngine)  # the pool faked at the actors; no cluster to connect to
    engine.pool, engine.session, engine._pending = pool, ClusterSession("10.0.0.1:6379", False), 0
    asyncio.run(pool.refresh())
    sampler = MetricsSampler(engine.stats, None, 5.0)
    sampler.sample()
    labels = {"model_name": "tiny-chat", "replica": "replica-z", "node": "10.0.0.1"}
    assert _value("llmos_replica_num_requests_running", **labels) == 1
    assert _value("llmos_replica_generation_tokens_total", **labels) == 21
    assert engine.stats()["replicas"][0]["requests_running"] == 1
    pool.replicas.clear()
    sampler.sample()
    assert _value("llmos_replica_generation_tokens_total", **labels) is None


def test_each_server_exports_its_own_requests_on_each_ready_replica() -> None:
    """A replica's running and waiting requests are its own counts, every server's (the same on
    each server); ``llmos_replica_server_requests_in_flight`` is this server's share of them, for
    the replicas it lists as ready (one another server is still placing has no id here yet)."""
    shared = {"pending_requests": 3, "models": {"m-1": _runner("tiny-chat", 3, 0, 50)}}
    need = ReplicaNeed(1, 1)
    busy = Replica("replica-a", "m-1", _Actor(_Method(shared)), NODE, need, mine=2, others=1, state="ready")
    idle = Replica("replica-b", "m-1", _Actor(_Method(shared)), NODE, need, state="ready")
    theirs = Replica("replica-provisional", "m-1", _Actor(_Method(shared)), NODE, need, placed_here=False)
    pool = _pool(busy, idle, theirs)
    engine = RayEngine.__new__(RayEngine)  # the pool faked at the actors; no cluster to connect to
    engine.pool, engine.session, engine._pending = pool, ClusterSession("10.0.0.1:6379", False), 0
    asyncio.run(pool.refresh())
    sampler = MetricsSampler(engine.stats, None, 5.0)
    sampler.sample()

    def series(replica: str) -> dict[str, str]:
        return {"model_name": "tiny-chat", "replica": replica, "node": "10.0.0.1"}

    assert _value("llmos_replica_num_requests_running", **series("replica-a")) == 3  # another server's too
    assert _value("llmos_replica_server_requests_in_flight", **series("replica-a")) == 2
    assert _value("llmos_replica_server_requests_in_flight", **series("replica-b")) == 0
    assert _value("llmos_replica_server_requests_in_flight", **series("replica-provisional")) is None
    busy.mine = 1  # one of this server's requests finished
    pool.replicas.remove(idle)  # scaled down
    sampler.sample()
    assert _value("llmos_replica_server_requests_in_flight", **series("replica-a")) == 1
    assert _value("llmos_replica_server_requests_in_flight", **series("replica-b")) is None
    pool.replicas.clear()
    sampler.sample()
    assert _value("llmos_replica_server_requests_in_flight", **series("replica-a")) is None


def test_single_process_mode_exports_no_replica_series() -> None:
    stats = {"models": {"m-9": _runner("solo-chat", 1, 0, 9)}}
    sampler = MetricsSampler(lambda: stats, None, 5.0)
    sampler.sample()
    assert _value("llmos_num_requests_running", model_name="solo-chat") == 1
    replica_series = [
        s
        for family in metrics.REGISTRY.collect()
        if family.name.startswith("llmos_replica_")
        for s in family.samples
        if s.labels.get("model_name") == "solo-chat"
    ]
    assert replica_series == []
    stats["models"] = {}
    sampler.sample()


def test_a_console_session_without_admin_cannot_see_the_cluster(platform: Platform) -> None:
    platform.tenants.create("acme")
    _, secret = platform.keys.create("acme-ops", tenant="acme", scopes=("inference", "models", "metrics"))
    with TestClient(create_app(platform=platform, engine=_BusyEngine())) as ui:
        _sign_in(ui, secret)
        assert 'href="/ui/cluster"' not in ui.get("/ui/overview").text
        assert ui.get("/ui/cluster").status_code == 403
        assert ui.get("/v1/admin/cluster").status_code == 403
    with TestClient(create_app(platform=platform, engine=_BusyEngine())) as ui:
        _sign_in(ui, ADMIN_KEY)
        assert 'href="/ui/cluster"' in ui.get("/ui/overview").text
        page = ui.get("/ui/cluster")
        assert page.status_code == 200 and '<script src="/ui/static/cluster.js">' in page.text
        assert ui.get("/v1/admin/cluster").json()["mode"] == "single-process"
