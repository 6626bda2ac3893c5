"""The engine replicas of each model: placed on the cluster's nodes, routed to, replaced when they die.

A model gets ``ray_min_replicas`` replicas on its first request. Each is placed by
``routing.choose_node`` on a node with room for its reservation (``ray_replica_cpus`` CPUs, the
memory the backend estimates for the model, the figure the memory manager budgets by, and for a
generating model ``ray_replica_gpus``; it sees only the GPUs it reserved: ``gpu_options``), pinned
there with Ray's node affinity, and loads its model before it takes requests; a placement under
way counts as reserved, so two models placed at once do not both take the room left on one node.
A replica whose actor dies is dropped at once (the requests it held end with an error) and a new
one is placed.

Every API server of the cluster shares them (ADR 0038): a replica is a detached actor named after
its model and a slot number (``replica_name``), so a server finds the others' replicas by name, and
two servers placing the same slot at once get one actor (Ray refuses the second name, or the
second creation dies as Ray registers it: ``_load``). Each server polls the replicas it knows
every ``POLL_S`` for their own counts of requests in flight, by server, and routes by them; a
server that stops leaves them running for the others. A server that scales a replica down or
unloads its model asks the replica to stop (it reports itself stopping, then ends itself,
``replica.STOP_GRACE_S`` later); only a replica that ends unannounced is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import ray
from ray._private import state as ray_state
from ray.exceptions import RayActorError, RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llmos.cluster.replica import EngineReplica
from llmos.cluster.routing import (
    POLL_S,
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

NAME_PREFIX = "llmos-replica:"


def replica_name(model_key: str, slot: int) -> str:
    """The Ray actor name of ``model_key``'s replica in ``slot`` (in the ``llmos`` namespace)."""
    return f"{NAME_PREFIX}{model_key}:{slot}"


def gpu_options(need: ReplicaNeed) -> dict[str, Any]:
    """The actor options that give a replica the GPUs of ``need`` and no others. Ray sets
    ``CUDA_VISIBLE_DEVICES`` to the GPUs it assigns an actor, but leaves the node's value alone
    for an actor that asked for none (Ray issue 54868; so in Ray 2.60), so such a replica would
    see every GPU of its node and its backend choice (ADR 0037) could start vLLM on one that a job
    or another replica reserved; an empty ``CUDA_VISIBLE_DEVICES`` hides them all, and it serves
    on CPUs."""
    if need.gpus:
        return {"num_gpus": need.gpus}
    return {"num_gpus": 0, "runtime_env": {"env_vars": {"CUDA_VISIBLE_DEVICES": ""}}}


class Claim(NamedTuple):
    """What a replica reserves, and where."""

    model_key: str
    node_id: str
    need: ReplicaNeed


@dataclass(eq=False)
class Replica:
    replica_id: str
    model_key: str
    """The residency key of the runner it holds (the base model's id)."""
    actor: Any
    node: NodeCapacity
    need: ReplicaNeed
    slot: int = 0
    mine: int = 0
    """Requests this server sent it that have not finished."""
    others: int = 0
    """Requests the other servers have in flight on it, as it last reported (``POLL_S`` old at most)."""
    adapters: set[str] = field(default_factory=set)
    """Adapters this server routed to it and those it reported holding."""
    state: str = "starting"
    pid: int | None = None
    placed_here: bool = True
    """This server placed it (False: found by its name, placed by another server)."""
    ready_by: float | None = None
    """Found still loading: the ``time.monotonic()`` by which it must be ready, or it is replaced
    (its placing server, which would time it out, may be gone)."""
    stopping: bool = False
    report: dict[str, Any] = field(default_factory=dict)
    """Its engine's latest ``stats()`` (``refresh``); empty until it answers, and when it last did not."""

    @property
    def queue_depth(self) -> int:
        """Requests in flight on it from every server: what routing and scaling go by."""
        return self.mine + self.others

    def load(self) -> ReplicaLoad:
        return ReplicaLoad(self.replica_id, self.queue_depth, frozenset(self.adapters))

    def take_report(self, report: dict[str, Any], server: str) -> None:
        """Its ``report_load`` answer: the other servers' requests and the adapters it holds."""
        in_flight: dict[str, int] = report["in_flight"]
        self.replica_id = report["replica_id"]
        self.others = sum(n for s, n in in_flight.items() if s != server)
        self.adapters.update(report["adapters"])
        self.stopping = bool(report["stopping"])
        self.pid = report["pid"]
        if report["ready"] and self.state == "starting" and not self.placed_here:
            self.state = "ready"  # another server's replica finished loading


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
        self.server_id = f"server-{uuid.uuid4().hex[:12]}"
        """This server, as replicas count their requests by sender."""
        self._starting: dict[str, asyncio.Lock] = {}
        self._watching: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._claimed: dict[str, Claim] = {}
        """The replicas this server is placing right now, by name (from ``_place``'s threads)."""
        self._choosing = threading.Lock()
        """Held while a placement chooses its node and claims it: placements running at once (two
        models' ``ensure``, each ``_place`` in a thread) each count the other's reservation."""
        self._actor_class = ray.remote(EngineReplica)

    def ready(self, model_key: str) -> list[Replica]:
        return [r for r in self.live(model_key) if r.state == "ready" and not r.stopping]

    def live(self, model_key: str) -> list[Replica]:
        """Its replicas that are ready or starting, by slot."""
        return sorted((r for r in self.replicas if r.model_key == model_key), key=lambda r: r.slot)

    async def route(self, model_key: str, adapter: str | None) -> Replica:
        """The replica a request for ``model_key`` (and ``adapter`` on it) goes to, starting the
        model's replicas first if it has none ready."""
        ready = self.ready(model_key)
        if not ready:
            await self.ensure(model_key)  # finds other servers' replicas first
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
            await self.discover()
            missing = (wanted or self.settings.ray_min_replicas) - len(self.live(model_key))
            capacity = await asyncio.to_thread(self.nodes_capacity) if missing > 0 else []
            placed: list[Replica] = []
            failures: list[BaseException] = []
            taken = {r.slot for r in self.live(model_key)}
            free_slots = (slot for slot in itertools.count() if slot not in taken)
            for slot in itertools.islice(free_slots, max(0, missing)):
                try:
                    placed.append(await asyncio.to_thread(self._place, model_key, capacity, slot))
                except ServiceUnavailableError as exc:  # no room for more: start those that fit
                    failures.append(exc)
                    break
            results = await asyncio.gather(*(self._start(r) for r in placed), return_exceptions=True)
        failures += [r for r in results if isinstance(r, BaseException)]
        if failures and not self.ready(model_key):
            raise failures[0]

    def _place(self, model_key: str, capacity: list[NodeCapacity], slot: int) -> Replica:
        """A replica of ``model_key`` in ``slot``: placed here, or, if another server has just
        placed that slot, theirs (waited for like one of ours)."""
        need = self.need_of(model_key)
        name = replica_name(model_key, slot)
        with self._choosing:
            node = choose_node(capacity, self._held(), need, model_key)
            if node is None:
                gpus = f", {need.gpus:g} GPU" if need.gpus else ""
                raise ServiceUnavailableError(
                    f"no node of the Ray cluster has room for a replica of {self.name_of(model_key)} "
                    f"({need.cpus:g} CPUs, {need.memory_bytes >> 20} MB{gpus})",
                    retry_after=30.0,
                )
            # Claimed until the replica is in ``replicas``: ``_held`` counts the claim (the next
            # placement sees its room taken), and ``discover`` (on the event loop, while this runs
            # in a thread) looks at the claims before the list, so it sees the name in one of them.
            self._claimed[name] = Claim(model_key, node.node_id, need)
        replica_id = f"replica-{uuid.uuid4().hex[:12]}"
        placed_here = True
        try:
            creating = self._actor_class.options(
                name=name,
                namespace="llmos",
                lifetime="detached",  # outlives this server: the others may be streaming from it
                num_cpus=need.cpus,
                memory=max(1, need.memory_bytes),
                **gpu_options(need),
                scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False),
                max_restarts=0,  # a dead replica is replaced by a pool, which knows what it held
            )
            try:  # only the creation: Ray refuses a taken name there, with a ValueError
                actor = creating.remote(self.settings, replica_id, model_key, slot, node.node_id)
            except ValueError:  # the name is taken: another server placed this slot a moment ago
                try:
                    actor = ray.get_actor(name, namespace="llmos")
                except ValueError as exc:  # and it is gone already
                    raise ServiceUnavailableError(
                        f"an engine replica of {self.name_of(model_key)} was stopped as it was placed; retry shortly",
                        retry_after=1.0,
                    ) from exc
                placed_here = False  # its id and node come with its first report (``_start``)
            known = self._by_name(name)
            if known is not None:  # ``discover`` took it in first
                return known
            replica = Replica(replica_id, model_key, actor, node, need, slot=slot, placed_here=placed_here)
            self.replicas.append(replica)  # its reservation counts from now on
            return replica
        finally:
            self._claimed.pop(name, None)

    def _by_name(self, name: str) -> Replica | None:
        return next((r for r in self.replicas if replica_name(r.model_key, r.slot) == name), None)

    def _node(self, node_id: str) -> NodeCapacity | None:
        return next((n for n in self.nodes_capacity() if n.node_id == node_id), None)

    async def _start(self, replica: Replica) -> None:
        self._watch()  # from placement on, not from the first ready replica: loading ones are polled too
        try:
            if replica.placed_here and not await self._load(replica):
                replica.placed_here = False
            if not replica.placed_here:  # the server that placed it is loading it: wait until it says so
                await asyncio.wait_for(self._until_ready(replica), REPLICA_START_TIMEOUT_S)
            report: dict[str, Any] = await replica.actor.report_load.remote()
            replica.take_report(report, self.server_id)
            if not replica.placed_here:
                found = await asyncio.to_thread(self._node, report["node_id"])
                replica.node = found or replica.node
        except BaseException:
            log.exception("engine replica %s of %s failed to start", replica.replica_id, replica.model_key)
            self._drop(replica)
            raise
        replica.state = "ready"
        self._watch()
        log.info(
            "engine replica %s of %s ready on node %s", replica.replica_id, replica.model_key, replica.node.address
        )

    async def _load(self, replica: Replica) -> bool:
        """Load its model. False: its actor lost the name to another server's, created at the
        same moment, and ``replica`` now holds theirs. Ray checks that a name is free before it
        creates the actor, so two servers can both pass the check; the second creation then fails
        in Ray's control store, and the handle it gave answers ``RayActorError``."""
        try:
            await asyncio.wait_for(replica.actor.load.remote(replica.model_key, False), REPLICA_START_TIMEOUT_S)
            return True
        except RayActorError:
            theirs = await asyncio.to_thread(_named_actor, replica_name(replica.model_key, replica.slot))
            if theirs is None:  # nobody holds the name: ours died loading
                raise
            # Ours, if it exists at all: a handle whose creation was refused may make Ray's kill
            # fail, which must not lose the slot we just found held.
            with contextlib.suppress(RayError, ValueError):
                await asyncio.to_thread(ray.kill, replica.actor, no_restart=True)
            replica.actor = theirs
            return False

    async def _until_ready(self, replica: Replica) -> None:
        while not (await replica.actor.report_load.remote())["ready"]:
            await asyncio.sleep(POLL_S)

    def _watch(self) -> None:
        if self._watching is None:  # from the first replica on: there is nothing to read before
            self._watching = asyncio.get_running_loop().create_task(self.watch(self.settings.metrics_sample_interval_s))

    async def discover(self) -> None:
        """Take in the replicas other servers placed (by their names) that this server does not know."""
        known = {replica_name(r.model_key, r.slot) for r in self.replicas} | set(self._claimed)
        found = await asyncio.to_thread(_replica_names)
        for name in sorted(set(found) - known):
            try:
                actor = await asyncio.to_thread(ray.get_actor, name, "llmos")
                report: dict[str, Any] = await asyncio.wait_for(actor.report_load.remote(), STATS_TIMEOUT_S)
            except (ValueError, RayError, TimeoutError):  # gone meanwhile, or busy dying: the next round
                continue
            node = await asyncio.to_thread(self._node, report["node_id"])
            # The claims before the list: ``_place`` lets go of its claim only once its replica is listed.
            if report["stopping"] or node is None or name in self._claimed or self._by_name(name) is not None:
                continue  # stopping, on a node gone, or placed or taken in here meanwhile
            replica = Replica(
                report["replica_id"],
                report["model_key"],
                actor,
                node,
                self.need_of(report["model_key"]),
                slot=report["slot"],
                placed_here=False,
            )
            replica.take_report(report, self.server_id)
            if replica.state == "starting":
                replica.ready_by = time.monotonic() + REPLICA_START_TIMEOUT_S
            self.replicas.append(replica)
            log.info("found engine replica %s of %s on node %s", replica.replica_id, replica.model_key, node.address)
        if self.replicas:
            self._watch()

    async def poll(self) -> None:
        """Each known replica's own counts; a replica that is gone is dropped (and, if it was not
        being scaled down, replaced up to the model's minimum)."""
        known = list(self.replicas)
        replies = await asyncio.gather(
            *(asyncio.wait_for(r.actor.report_load.remote(), STATS_TIMEOUT_S) for r in known), return_exceptions=True
        )
        for replica, reply in zip(known, replies, strict=True):
            if isinstance(reply, dict):
                replica.take_report(reply, self.server_id)
                if replica.state == "starting" and replica.ready_by is not None and time.monotonic() > replica.ready_by:
                    self.lost(replica, TimeoutError(f"not ready {REPLICA_START_TIMEOUT_S:g} s after it was found"))
            elif isinstance(reply, RayActorError):
                if replica.stopping:  # a server scaled it down
                    self._forget(replica)
                else:
                    self.lost(replica, reply)

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
        """Stop an idle replica the model no longer needs (scaling down), unless it has taken a
        request meanwhile (from any server) or another server is stopping it."""
        replica.stopping = True  # no more routing to it here
        task = asyncio.get_running_loop().create_task(self._stop(replica))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop(self, replica: Replica) -> None:
        try:
            stopped = await asyncio.wait_for(replica.actor.stop_if_idle.remote(), STATS_TIMEOUT_S)
        except (RayError, TimeoutError):
            stopped = False
        if stopped:  # it ends itself once every server has polled it as stopping
            log.info("stopping idle engine replica %s of %s", replica.replica_id, replica.model_key)
            self._forget(replica)
        else:
            replica.stopping = False  # its next report says whether someone else is stopping it

    def _forget(self, replica: Replica) -> None:
        replica.state = "dead"
        if replica in self.replicas:
            self.replicas.remove(replica)

    def _drop(self, replica: Replica) -> None:
        self._forget(replica)
        ray.kill(replica.actor, no_restart=True)

    async def retire(self, model_key: str) -> None:
        """Stop every replica of ``model_key`` (the model was unloaded): each reports itself
        stopping, so the other servers forget it rather than replace it, and ends itself; one that
        does not answer within ``STATS_TIMEOUT_S`` is killed."""
        retiring = [r for r in self.replicas if r.model_key == model_key]
        for replica in retiring:
            replica.stopping = True
            self._forget(replica)
        replies = await asyncio.gather(
            *(asyncio.wait_for(r.actor.retire.remote(), STATS_TIMEOUT_S) for r in retiring), return_exceptions=True
        )
        for replica, reply in zip(retiring, replies, strict=True):
            if isinstance(reply, BaseException):
                ray.kill(replica.actor, no_restart=True)

    def forget_adapter(self, adapter: str) -> None:
        for replica in self.replicas:
            replica.adapters.discard(adapter)

    def _held(self) -> dict[str, Reservation]:
        """What the listed replicas and the placements under way reserve on each node."""
        replicas = list(self.replicas)  # a copy: the event loop lists and drops while this runs in a thread
        listed = [Claim(r.model_key, r.node.node_id, r.need) for r in replicas]
        names = {replica_name(r.model_key, r.slot) for r in replicas}
        # A claim whose replica is listed already (its placement is just ending) counts once.
        placing = [claim for name, claim in list(self._claimed.items()) if name not in names]
        return _reserved(listed + placing)

    def nodes(self) -> list[NodeView]:
        return cluster_nodes()

    def nodes_capacity(self) -> list[NodeCapacity]:
        """Each live node's resources for replicas: its totals less what other Ray actors hold there
        (fine-tuning jobs' workers, whose CPUs, memory and GPUs Ray counts as reserved), so that a
        replica is not placed on a GPU a job holds and then waits for it. The replicas themselves
        are subtracted by the node choice (``_held``), placements Ray may not count yet included."""
        listed = _reserved([Claim(r.model_key, r.node.node_id, r.need) for r in list(self.replicas)])
        capacity = []
        for n in self.nodes():
            if not n.alive:
                continue
            mine = listed.get(n.node_id, Reservation())
            capacity.append(
                NodeCapacity(
                    n.node_id,
                    n.address,
                    cpus=_left_by_others(n, "CPU", mine.cpus),
                    memory_bytes=int(_left_by_others(n, "memory", mine.memory_bytes)),
                    gpus=_left_by_others(n, "GPU", mine.gpus),
                )
            )
        return capacity

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
        """``poll`` and ``discover`` every ``POLL_S``, ``refresh`` every ``interval_s`` (the metrics
        sampler reads the reports), until cancelled."""
        every = max(1, round(interval_s / POLL_S))
        for tick in itertools.count():
            try:
                await self.poll()
                await self.discover()
                if tick % every == 0:
                    await self.refresh()
            except Exception:  # a failed round must not end the reports
                log.exception("reading the engine replicas' loads and stats failed")
            await asyncio.sleep(POLL_S)

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

    def close(self, *, stop_replicas: bool) -> None:
        """Stop polling. The replicas stay for the other servers (each ends itself once no server
        has polled it for ``replica.LEASE_S``), unless ``stop_replicas`` (this server started the
        cluster, which ends with it)."""
        if self._watching is not None:
            self._watching.cancel()
        for task in list(self._stopping):
            task.cancel()
        if stop_replicas:
            for replica in list(self.replicas):
                self._drop(replica)


def _reserved(claims: list[Claim]) -> dict[str, Reservation]:
    """What ``claims`` reserve on each node, by node id."""
    held: dict[str, Reservation] = {}
    for claim in claims:
        reservation = held.setdefault(claim.node_id, Reservation())
        reservation.cpus += claim.need.cpus
        reservation.memory_bytes += claim.need.memory_bytes
        reservation.gpus += claim.need.gpus
        reservation.models.append(claim.model_key)
    return held


def _left_by_others(node: NodeView, key: str, replicas: float) -> float:
    """``node``'s total of resource ``key`` less what Ray counts reserved there beyond ``replicas``
    (the listed replicas' share): what other actors leave. The total where Ray says nothing."""
    total = node.resources.get(key, 0.0)
    if node.available is None:
        return total
    return total - max(0.0, total - node.available.get(key, 0.0) - replicas)


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


def joined_cluster_nodes() -> list[NodeView]:
    """``cluster_nodes`` once this process has joined the cluster; none before (a command that
    opens the platform without serving)."""
    return cluster_nodes() if ray.is_initialized() else []


def _named_actor(name: str) -> Any:
    """The live actor named ``name`` in the ``llmos`` namespace (None: there is none)."""
    try:
        return ray.get_actor(name, namespace="llmos")
    except ValueError:
        return None


def _replica_names() -> list[str]:
    """The names of the replicas alive in the ``llmos`` namespace (each server's driver joins it)."""
    return [n for n in ray.util.list_named_actors() if n.startswith(NAME_PREFIX)]


def _amounts(resources: dict[str, Any]) -> dict[str, float]:
    """Ray's resources without the one per node that only names it (``node:<address>``)."""
    return {k: float(v) for k, v in resources.items() if not k.startswith("node:")}
