"""Engine replicas shared by several API servers (ADR 0038), without Ray: a replica's own ledger
of requests by server, and the pool's use of it (routing by every server's requests, replicas
found by name, replicas stopped by another server, a server that stops leaving them running),
with the actors faked at the boundary."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray", reason='the replica pool needs the ray extra (pip install "llmos[ray]")')

from ray.exceptions import RayActorError, RayError

from llmos.cluster import pool as pool_module
from llmos.cluster.pool import Replica, ReplicaPool, replica_name
from llmos.cluster.replica import STOP_GRACE_S, ReplicaLedger
from llmos.cluster.routing import POLL_S, NodeCapacity, ReplicaNeed
from llmos.config import Settings
from llmos.errors import ReplicaStopping

N1, N2 = "a1" * 28, "b2" * 28
"""Node ids as Ray writes them (28 bytes in hex): ``NodeAffinitySchedulingStrategy`` refuses others."""
NODE = NodeCapacity(N1, "10.0.0.1", cpus=4, memory_bytes=1 << 33)
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
    with pytest.raises(ReplicaStopping) as refused:
        ledger.admit("server-a", "base")
    assert refused.value.retry_after >= 1, "a client whose retries ran out waits a second at least"
    assert ledger.report()["stopping"]


def test_a_replica_whose_servers_stopped_polling_lapses_once_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("llmos.cluster.replica.time.monotonic", lambda: now[0])
    ledger = ReplicaLedger("replica-1", "base", 0, "n1")
    ledger.loaded()
    ledger.admit("server-a", "base")
    now[0] += 61
    assert not ledger.lapsed(), "a request is still in flight"
    ledger.release("server-a")
    assert ledger.lapsed()
    ledger.report()  # a server polled: the lease is renewed
    assert not ledger.lapsed()


def test_a_replica_does_not_lapse_while_its_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("llmos.cluster.replica.time.monotonic", lambda: now[0])
    ledger = ReplicaLedger("replica-1", "base", 0, "n1")
    now[0] += 300  # a long load: no server polls it before it is ready
    assert not ledger.over()
    ledger.loaded()  # its lease runs from now
    assert not ledger.over()
    now[0] += 61
    assert ledger.over()


def test_a_stopped_replica_ends_itself_only_after_the_servers_have_polled_it(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("llmos.cluster.replica.time.monotonic", lambda: now[0])
    ledger = ReplicaLedger("replica-1", "base", 0, "n1")
    ledger.loaded()
    assert ledger.stop_if_idle()
    assert not ledger.over(), "the other servers have not seen it stopping yet"
    now[0] += 2 * POLL_S
    assert not ledger.over()
    now[0] += STOP_GRACE_S
    assert ledger.over()


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
    ready: bool = True
    report_load: _Method = field(init=False)
    stop_if_idle: _Method = field(init=False)
    retire: _Method = field(init=False)
    load: _Method = field(init=False)

    def __post_init__(self) -> None:
        self.ledger.ready = self.ready
        self.load = _Method(lambda: self.broken)
        self.report_load = _Method(lambda: self.broken or self.ledger.report())
        self.stop_if_idle = _Method(lambda: self.broken or self.ledger.stop_if_idle())
        self.retire = _Method(lambda: self.broken or self.ledger.retire())


def _actor(replica_id: str, slot: int, *, ready: bool = True) -> _Actor:
    return _Actor(ReplicaLedger(replica_id, "m-1", slot, NODE.node_id), ready=ready)


@pytest.fixture
def killed(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The actors the pool kills (none is real): each answers RayActorError from then on."""
    kills: list[Any] = []

    def kill(actor: Any, no_restart: bool = True) -> None:
        kills.append(actor)
        actor.broken = RayActorError()

    monkeypatch.setattr(pool_module.ray, "kill", kill)
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
    assert pool.replicas == [replica_b] and a.ledger.stopping
    assert killed == [], "the replica ends itself, once the other servers have seen it stopping"


def _two_servers(monkeypatch: pytest.MonkeyPatch) -> tuple[_Actor, ReplicaPool, ReplicaPool]:
    """A replica placed by one server and found by another, both having polled it once."""
    a = _actor("replica-a", 0)
    named = {replica_name("m-1", 0): a}
    placer, other = _pool(monkeypatch, named), _pool(monkeypatch, named)
    placer.replicas.append(_replica(a))
    asyncio.run(other.discover())
    asyncio.run(placer.poll())
    return a, placer, other


def _end_itself(actor: _Actor, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the replica's own lease task does once ``over()``: checked, then it is gone."""
    later = actor.ledger.stopped_at + STOP_GRACE_S if actor.ledger.stopped_at is not None else 0.0
    monkeypatch.setattr("llmos.cluster.replica.time.monotonic", lambda: later)
    assert actor.ledger.over()
    actor.broken = RayActorError()


def test_a_replica_another_server_scales_down_is_not_replaced(
    monkeypatch: pytest.MonkeyPatch, killed: list[Any]
) -> None:
    a, placer, other = _two_servers(monkeypatch)

    async def stop() -> None:
        placer.stop(placer.replicas[0])
        await asyncio.gather(*placer._stopping)

    asyncio.run(stop())
    assert killed == [] and placer.replicas == []
    asyncio.run(other.poll())  # its next poll, before the replica ends itself
    assert other.ready("m-1") == []
    _end_itself(a, monkeypatch)
    asyncio.run(other.poll())
    assert other.replicas == [] and other.replaced == 0


def test_a_model_another_server_unloaded_is_not_placed_again(
    monkeypatch: pytest.MonkeyPatch, killed: list[Any]
) -> None:
    a, placer, other = _two_servers(monkeypatch)
    asyncio.run(other.retire("m-1"))  # unloaded through the server that did not place it
    assert killed == [] and other.replicas == [] and a.ledger.stopping
    asyncio.run(placer.poll())
    assert placer.ready("m-1") == []
    _end_itself(a, monkeypatch)
    asyncio.run(placer.poll())
    assert placer.replicas == [] and placer.replaced == 0


def test_a_replica_that_does_not_answer_its_retirement_is_killed(
    monkeypatch: pytest.MonkeyPatch, killed: list[Any]
) -> None:
    a, placer, _ = _two_servers(monkeypatch)
    a.broken = RayError()
    asyncio.run(placer.retire("m-1"))
    assert killed == [a] and placer.replicas == []


def test_the_poller_starts_when_a_replica_is_placed(monkeypatch: pytest.MonkeyPatch, killed: list[Any]) -> None:
    """A replica loading for longer than its lease is polled meanwhile: its lease runs once it is loaded."""
    pool = ReplicaPool(Settings(), lambda key: NEED, lambda key: key)
    loading = asyncio.Event()
    watching: list[float] = []

    async def watch(interval_s: float) -> None:
        watching.append(interval_s)
        await asyncio.Event().wait()

    class Loading:
        class load:  # an actor method
            @staticmethod
            async def remote(model_key: str, pin: bool) -> None:
                loading.set()
                await asyncio.Event().wait()

    monkeypatch.setattr(pool, "watch", watch)

    async def go() -> None:
        starting = asyncio.create_task(pool._start(Replica("replica-a", "m-1", Loading(), NODE, NEED)))
        await loading.wait()
        await asyncio.sleep(0)
        assert watching, "no poller while the replica loads"
        starting.cancel()
        pool._watching.cancel()  # type: ignore[union-attr]

    asyncio.run(go())


def test_a_found_replica_that_never_becomes_ready_is_replaced(
    monkeypatch: pytest.MonkeyPatch, killed: list[Any]
) -> None:
    stuck = _actor("replica-a", 0, ready=False)
    pool = _pool(monkeypatch, {replica_name("m-1", 0): stuck})
    placed: list[int] = []
    monkeypatch.setattr(pool, "_place", lambda key, capacity, slot: placed.append(slot) or _replica(_actor("r", slot)))
    monkeypatch.setattr(pool, "_start", lambda replica: asyncio.sleep(0))

    async def go() -> None:
        await pool.discover()
        await pool.poll()
        assert [r.state for r in pool.replicas] == ["starting"]
        found = pool.replicas[0]
        assert found.ready_by is not None and found.ready_by > time.monotonic() + 500
        found.ready_by = time.monotonic() - 1  # REPLICA_START_TIMEOUT_S later (asyncio's clock is left alone)
        await pool.poll()
        await asyncio.gather(*(t for t in asyncio.all_tasks() if t is not asyncio.current_task()))  # the replacement

    asyncio.run(go())
    assert killed == [stuck] and pool.replaced == 1 and 0 in placed


def test_a_server_that_stops_leaves_the_replicas_running(monkeypatch: pytest.MonkeyPatch, killed: list[Any]) -> None:
    pool = _pool(monkeypatch)
    pool.replicas += [_replica(_actor("replica-a", 0)), _replica(_actor("replica-b", 1), placed_here=False)]
    pool.close(stop_replicas=False)
    assert killed == []
    pool.close(stop_replicas=True)  # a server that started the cluster takes it down with it
    assert len(killed) == 2


def test_a_replica_being_placed_is_not_taken_in_by_discover_as_well(
    monkeypatch: pytest.MonkeyPatch, killed: list[Any]
) -> None:
    """``_place`` runs in a thread while ``discover`` runs on the event loop: a discover that looks
    at the very moment the placed replica is being listed must not list the same actor again."""
    actor = _actor("replica-a", 0)
    named = {replica_name("m-1", 0): actor}  # the actor is on the cluster by name once created
    pool = ReplicaPool(Settings(ray_min_replicas=1), lambda key: NEED, lambda key: key)
    monkeypatch.setattr(pool_module, "_replica_names", lambda: list(named))
    monkeypatch.setattr(pool_module.ray, "get_actor", lambda name, namespace=None: named[name])
    monkeypatch.setattr(pool, "nodes_capacity", lambda: [NODE])
    monkeypatch.setattr(pool, "_watch", lambda: None)

    class Placing:  # the actor class: creating one gives the named actor
        @staticmethod
        def options(**kwargs: Any) -> Any:
            return Placing

        @staticmethod
        def remote(*args: Any) -> _Actor:
            return actor

    monkeypatch.setattr(pool, "_actor_class", Placing)
    looked: list[bool] = []

    class Listing(list[Replica]):
        def append(self, replica: Replica) -> None:
            if not looked:  # the event loop's discover, just as the placing thread lists its replica
                looked.append(True)
                asyncio.run(pool.discover())
            super().append(replica)

    pool.replicas = Listing()
    placed = pool._place("m-1", [NODE], 0)
    assert looked and [r.replica_id for r in pool.replicas] == [placed.replica_id]


# -- placements at the same time ---------------------------------------------------------------
class _Cluster:
    """Ray's named actors as the pools see them: creating a name that is taken is refused
    (``ValueError``, as Ray does), or with ``racy`` gives a handle to an actor that never starts
    (both creations passed Ray's check of the name, and the control store refused the second);
    each creation waits at ``barrier`` until as many placing threads are creating, so the
    placements overlap however the threads are scheduled."""

    def __init__(self, overlapping: int, *, racy: bool = False) -> None:
        self.racy = racy
        self.named: dict[str, _Actor] = {}
        self.created: list[_Actor] = []
        self.barrier = threading.Barrier(overlapping, timeout=10)
        self._lock = threading.Lock()

    def actor_class(self) -> Any:
        cluster = self

        class Creating:  # ``options(...).remote(...)`` of the replica's actor class
            def __init__(self, **options: Any) -> None:
                self.options = options

            def remote(self, settings: Any, replica_id: str, model_key: str, slot: int, node_id: str) -> _Actor:
                cluster.barrier.wait()
                with cluster._lock:
                    if self.options["name"] in cluster.named:
                        if cluster.racy:
                            return _Actor(ReplicaLedger(replica_id, model_key, slot, node_id), RayActorError())
                        raise ValueError(f"actor name {self.options['name']} is taken")
                    actor = _Actor(ReplicaLedger(replica_id, model_key, slot, node_id))
                    cluster.named[self.options["name"]] = actor
                    cluster.created.append(actor)
                    return actor

        return SimpleNamespace(options=Creating)

    def pool(self, monkeypatch: pytest.MonkeyPatch, nodes: list[NodeCapacity], min_replicas: int) -> ReplicaPool:
        pool = ReplicaPool(Settings(ray_min_replicas=min_replicas), lambda key: NEED, lambda key: key)
        monkeypatch.setattr(pool, "nodes_capacity", lambda: nodes)
        monkeypatch.setattr(pool, "_watch", lambda: None)
        monkeypatch.setattr(pool, "_actor_class", self.actor_class())
        return pool

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(pool_module, "_replica_names", lambda: list(self.named))
        monkeypatch.setattr(pool_module.ray, "get_actor", lambda name, namespace=None: self.named[name])


@pytest.mark.parametrize(
    ("racy", "kill_fails"),
    [(False, False), (True, False), (True, True)],
    ids=["name-refused", "second-creation-dies", "second-creation-dies-and-its-kill-fails"],
)
def test_two_servers_placing_a_model_at_once_share_one_actor_per_slot(
    monkeypatch: pytest.MonkeyPatch, killed: list[Any], racy: bool, kill_fails: bool
) -> None:
    """Two servers' first requests for a model at once: each places slots 0 and 1 while the other
    does. Each slot gets one actor (Ray refuses the second name, or the second creation dies, and
    the loser takes the winner's), each server lists each actor once, and both servers end with
    both replicas ready."""
    cluster = _Cluster(overlapping=2, racy=racy)
    cluster.install(monkeypatch)
    if kill_fails:  # Ray refusing to kill a handle whose actor was never created

        def failing_kill(actor: Any, no_restart: bool = True) -> None:
            killed.append(actor)
            raise ValueError("ray.kill() only supported for actors")

        monkeypatch.setattr(pool_module.ray, "kill", failing_kill)
    nodes = [NODE, NodeCapacity(N2, "10.0.0.2", cpus=4, memory_bytes=1 << 33)]
    first, second = cluster.pool(monkeypatch, nodes, 2), cluster.pool(monkeypatch, nodes, 2)

    async def go() -> list[list[tuple[int, str]]]:
        await asyncio.gather(first.ensure("m-1"), second.ensure("m-1"))
        placed = [[(r.slot, r.state) for r in p.live("m-1")] for p in (first, second)]
        await asyncio.gather(first.discover(), second.discover())  # a later round takes in nothing more
        return placed

    placed = asyncio.run(go())
    assert placed == [[(0, "ready"), (1, "ready")]] * 2, "each server has both as its first request goes on"
    assert [a.ledger.slot for a in cluster.created] in ([0, 1], [1, 0]), "one actor per slot"
    for pool in (first, second):
        assert [(r.slot, r.state) for r in pool.live("m-1")] == [(0, "ready"), (1, "ready")]
        assert sorted(id(r.actor) for r in pool.replicas) == sorted(id(a) for a in cluster.created)
        assert [r.replica_id for r in pool.live("m-1")] == [
            cluster.named[replica_name("m-1", s)].ledger.replica_id for s in (0, 1)
        ]
    for slot in (0, 1):
        assert sorted(p.live("m-1")[slot].placed_here for p in (first, second)) == [False, True]
    assert not any(k is a for k in killed for a in cluster.created), "only the losers' handles are killed"
    assert len(killed) == (2 if racy else 0)


def test_two_models_placed_at_once_do_not_take_the_same_room(
    monkeypatch: pytest.MonkeyPatch, killed: list[Any]
) -> None:
    """One server placing two models at once (each ``_place`` in a thread of its own): each
    placement counts the other's reservation, so two nodes with room for one replica each get
    one each, rather than both going to the node that looked emptier."""
    cluster = _Cluster(overlapping=2)
    cluster.install(monkeypatch)
    room_for_one = [
        NodeCapacity(N1, "10.0.0.1", cpus=1, memory_bytes=1 << 30),
        NodeCapacity(N2, "10.0.0.2", cpus=1, memory_bytes=1 << 29),
    ]
    pool = cluster.pool(monkeypatch, room_for_one, 1)

    async def go() -> None:
        await asyncio.gather(pool.ensure("m-1"), pool.ensure("m-2"))

    asyncio.run(go())
    assert sorted((r.model_key, r.state) for r in pool.replicas) == [("m-1", "ready"), ("m-2", "ready")]
    assert sorted(r.node.node_id for r in pool.replicas) == [N1, N2]
    assert sorted(a.ledger.node_id for a in cluster.created) == [N1, N2]
