"""Engine replicas shared by several API servers (ADR 0038), without Ray: a replica's own ledger
of requests by server, and the pool's use of it (routing by every server's requests, replicas
found by name, replicas stopped by another server, a server that stops leaving them running),
with the actors faked at the boundary."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

pytest.importorskip("ray", reason='the replica pool needs the ray extra (pip install "llmos[ray]")')

from ray.exceptions import RayActorError

from llmos.cluster import pool as pool_module
from llmos.cluster.pool import Replica, ReplicaPool, replica_name
from llmos.cluster.replica import ReplicaLedger, ReplicaStopping
from llmos.cluster.routing import NodeCapacity, ReplicaNeed
from llmos.config import Settings

NODE = NodeCapacity("n1", "10.0.0.1", cpus=4, memory_bytes=1 << 33)
NEED = ReplicaNeed(1, 1)


# -- the replica's ledger ------------------------------------------------------------------------
def test_the_ledger_counts_requests_by_server_and_the_adapters_asked_for() -> None:
    ledger = ReplicaLedger("replica-1", "base", 0, "n1")
    ledger.admit("server-a", "base")
    ledger.admit("server-a", "adapter-x")
    ledger.admit("server-b", "base")
    report = ledger.report()
    assert report["in_flight"] == {"server-a": 2, "server-b": 1}
    assert report["adapters"] == ["adapter-x"]
    ledger.release("server-a")
    ledger.release("server-b")
    assert ledger.report()["in_flight"] == {"server-a": 1}


def test_a_replica_is_stopped_only_when_idle_and_only_once() -> None:
    ledger = ReplicaLedger("replica-1", "base", 0, "n1")
    ledger.admit("server-b", "base")
    assert not ledger.stop_if_idle(), "another server's request is in flight"
    ledger.release("server-b")
    assert ledger.stop_if_idle()
    assert not ledger.stop_if_idle(), "a second server scaling down at once stops nothing more"
    with pytest.raises(ReplicaStopping):
        ledger.admit("server-a", "base")
    assert ledger.report()["stopping"]


def test_a_replica_whose_servers_stopped_polling_lapses_once_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("llmos.cluster.replica.time.monotonic", lambda: now[0])
    ledger = ReplicaLedger("replica-1", "base", 0, "n1")
    ledger.admit("server-a", "base")
    now[0] += 61
    assert not ledger.lapsed(), "a request is still in flight"
    ledger.release("server-a")
    assert ledger.lapsed()
    ledger.report()  # a server polled: the lease is renewed
    assert not ledger.lapsed()


# -- the pool, with actors faked -----------------------------------------------------------------
@dataclass
class _Method:
    answer: Any
    calls: int = 0

    def remote(self, *args: Any) -> Any:
        self.calls += 1
        answer = self.answer() if callable(self.answer) else self.answer

        async def reply() -> Any:
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return reply()


@dataclass
class _Actor:
    ledger: ReplicaLedger
    broken: BaseException | None = None
    report_load: _Method = field(init=False)
    stop_if_idle: _Method = field(init=False)

    def __post_init__(self) -> None:
        self.ledger.ready = True
        self.report_load = _Method(lambda: self.broken or self.ledger.report())
        self.stop_if_idle = _Method(lambda: self.ledger.stop_if_idle())


def _actor(replica_id: str, slot: int) -> _Actor:
    return _Actor(ReplicaLedger(replica_id, "m-1", slot, NODE.node_id))


@pytest.fixture
def killed(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The actors the pool kills (none is real)."""
    kills: list[Any] = []
    monkeypatch.setattr(pool_module.ray, "kill", lambda actor, no_restart=True: kills.append(actor))
    return kills


def _pool(monkeypatch: pytest.MonkeyPatch, named: dict[str, _Actor] | None = None) -> ReplicaPool:
    """A pool of a model with two replicas at least, on a cluster whose named replicas are
    ``named`` and whose one node is ``NODE``."""
    pool = ReplicaPool(Settings(ray_min_replicas=2), lambda key: NEED, lambda key: key)
    actors = named or {}
    monkeypatch.setattr(pool_module, "_replica_names", lambda: list(actors))
    monkeypatch.setattr(pool_module.ray, "get_actor", lambda name, namespace=None: actors[name])
    monkeypatch.setattr(pool, "nodes_capacity", lambda: [NODE])
    monkeypatch.setattr(pool, "_watch", lambda: None)  # no background polling in these tests

    def place(key: str, capacity: object, slot: int) -> None:  # never a real actor (nor a Ray started for it)
        raise AssertionError(f"placed slot {slot} of {key}")

    monkeypatch.setattr(pool, "_place", place)
    return pool


def _replica(actor: _Actor, *, placed_here: bool = True) -> Replica:
    ledger = actor.ledger
    return Replica(
        ledger.replica_id, "m-1", actor, NODE, NEED, slot=ledger.slot, state="ready", placed_here=placed_here
    )


def test_a_server_routes_by_every_servers_requests_on_each_replica(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _actor("replica-a", 0), _actor("replica-b", 1)
    pool = _pool(monkeypatch)
    pool.replicas += [_replica(a), _replica(b)]
    for _ in range(3):  # another server's requests on replica-a
        a.ledger.admit("server-other", "m-1")
    b.ledger.admit(pool.server_id, "m-1")  # and one of this server's on replica-b

    async def go() -> Replica:
        await pool.poll()
        return await pool.route("m-1", None)

    chosen = asyncio.run(go())
    assert chosen.replica_id == "replica-b", "3 requests from another server outweigh 1 of this server's"
    assert [(r.mine, r.others) for r in pool.replicas] == [(0, 3), (0, 0)]
    assert [r.queue_depth for r in pool.replicas] == [3, 0]  # its own came from its count, not the report


def test_an_adapter_another_server_loaded_counts_for_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _actor("replica-a", 0), _actor("replica-b", 1)
    pool = _pool(monkeypatch)
    pool.replicas += [_replica(a), _replica(b)]
    b.ledger.admit("server-other", "adapter-x")
    b.ledger.release("server-other")
    a.ledger.admit("server-other", "m-1")  # replica-b is also the less busy one: make it the busier
    b.ledger.admit("server-other", "m-1")
    b.ledger.admit("server-other", "m-1")

    async def go() -> Replica:
        await pool.poll()
        return await pool.route("m-1", "adapter-x")

    assert asyncio.run(go()).replica_id == "replica-b", "the replica holding the adapter, below the queue limit"


def test_a_server_finds_the_replicas_another_placed_and_places_none(
    monkeypatch: pytest.MonkeyPatch, killed: list[Any]
) -> None:
    named = {replica_name("m-1", 0): _actor("replica-a", 0), replica_name("m-1", 1): _actor("replica-b", 1)}
    named[replica_name("m-1", 1)].ledger.admit("server-other", "m-1")
    pool = _pool(monkeypatch, named)
    # placing a slot would fail the test (``_pool``): both are another server's replicas

    async def go() -> Replica:
        chosen = await pool.route("m-1", None)  # the first request: finds the model's replicas
        await pool.discover()  # again: each replica is taken in once
        return chosen

    chosen = asyncio.run(go())
    assert sorted((r.replica_id, r.slot, r.state, r.placed_here) for r in pool.replicas) == [
        ("replica-a", 0, "ready", False),
        ("replica-b", 1, "ready", False),
    ]
    assert chosen.replica_id == "replica-a"


def test_a_replica_another_server_scaled_down_is_forgotten_not_replaced(
    monkeypatch: pytest.MonkeyPatch, killed: list[Any]
) -> None:
    a, b = _actor("replica-a", 0), _actor("replica-b", 1)
    pool = _pool(monkeypatch)
    pool.replicas += [_replica(a), _replica(b)]
    asyncio.run(pool.poll())
    assert b.ledger.stop_if_idle()  # another server stops it...
    asyncio.run(pool.poll())
    assert pool.ready("m-1") == [pool.replicas[0]], "...so this one routes no more to it"
    b.broken = RayActorError()  # ...and kills it
    asyncio.run(pool.poll())
    assert [r.replica_id for r in pool.replicas] == ["replica-a"]
    assert pool.replaced == 0


def test_scaling_down_stops_a_replica_only_if_no_server_has_a_request_on_it(
    monkeypatch: pytest.MonkeyPatch, killed: list[Any]
) -> None:
    a, b = _actor("replica-a", 0), _actor("replica-b", 1)
    pool = _pool(monkeypatch)
    replica_a, replica_b = _replica(a), _replica(b)
    pool.replicas += [replica_a, replica_b]
    b.ledger.admit("server-other", "m-1")  # arrived after this server's last poll

    async def stop(replica: Replica) -> None:
        pool.stop(replica)
        await asyncio.gather(*pool._stopping)

    asyncio.run(stop(replica_b))
    assert killed == [] and replica_b in pool.replicas and not replica_b.stopping
    asyncio.run(stop(replica_a))
    assert killed == [a] and pool.replicas == [replica_b]


def test_a_server_that_stops_leaves_the_replicas_running(monkeypatch: pytest.MonkeyPatch, killed: list[Any]) -> None:
    pool = _pool(monkeypatch)
    pool.replicas += [_replica(_actor("replica-a", 0)), _replica(_actor("replica-b", 1), placed_here=False)]
    pool.close(stop_replicas=False)
    assert killed == []
    pool.close(stop_replicas=True)  # a server that started the cluster takes it down with it
    assert len(killed) == 2
