"""Jobs placed on a cluster's nodes (issue 21 point 1, docs/scaling.md) without Ray: the node a job's
worker goes to, a queue that waits (no attempt spent) while no node has room, and a worker lost with
its node settled and started again elsewhere as the next attempt, whose heartbeats alone count."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import types
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from pathlib import Path
from typing import Any

import pytest

from llmos.cluster.routing import NodeCapacity, ReplicaNeed, choose_job_node
from llmos.kernel.job_heartbeat import EXIT_STOPPED
from llmos.kernel.job_record import Job
from llmos.kernel.job_status import JobStatus, StopRequest
from llmos.kernel.job_workers import NoRoom, Placement
from llmos.kernel.supervisor import STALE_AFTER, START_WAITS, JobSupervisor
from llmos.platform import Platform
from llmos.registry.tables import JobRow

GB = 1 << 30
NEED = ReplicaNeed(cpus=1.0, memory_bytes=2 * GB)
ROWS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(4)]


def test_a_job_goes_to_a_node_with_room_other_than_the_servers() -> None:
    server = NodeCapacity("head", "10.0.0.1", cpus=4, memory_bytes=8 * GB)
    worker = NodeCapacity("node-2", "10.0.0.2", cpus=1, memory_bytes=2 * GB)
    assert choose_job_node([server, worker], NEED, "head") == worker  # fewer free CPUs, but not the server's
    full = NodeCapacity("node-2", "10.0.0.2", cpus=0.5, memory_bytes=8 * GB)
    assert choose_job_node([server, full], NEED, "head") == server  # the server's node when no other has room


def test_the_most_free_cpus_then_memory_win_and_no_room_is_none() -> None:
    a = NodeCapacity("a", "10.0.0.2", cpus=2, memory_bytes=3 * GB)
    b = NodeCapacity("b", "10.0.0.3", cpus=3, memory_bytes=3 * GB)
    c = NodeCapacity("c", "10.0.0.4", cpus=3, memory_bytes=4 * GB)
    assert choose_job_node([a, b, c], NEED, "head") == c
    short_of_memory = NodeCapacity("d", "10.0.0.5", cpus=8, memory_bytes=GB)
    assert choose_job_node([short_of_memory], NEED, "head") is None
    assert choose_job_node([], NEED, "head") is None


@dataclass
class _Worker:
    """A worker as the supervisor watches it; ``code`` set once it has ended."""

    code: int | None = None
    pid: int | None = None
    terminated: bool = False
    started: bool = True

    def poll(self) -> int | None:
        return self.code

    def terminate(self) -> None:
        self.terminated = True

    def kill(self) -> None:
        self.code = -9

    def wait(self, timeout: float | None = None) -> int:
        return self.code if self.code is not None else 0


@dataclass
class _Launcher:
    """Offers the next node of ``offers`` (or why none has room) and records what it starts."""

    offers: list[Placement | NoRoom]
    started: list[tuple[str, Placement, _Worker]] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    """The attempt each worker was started for."""

    def place(self, job: Job) -> Placement | NoRoom:
        return self.offers.pop(0)

    def start(self, job_id: str, attempt: int, placement: Placement) -> _Worker:
        worker = _Worker()
        self.started.append((job_id, placement, worker))
        self.attempts.append(attempt)
        return worker


NODE_2 = Placement("node-2", "10.0.0.2")
HEAD = Placement("head", "10.0.0.1")
BUSY = NoRoom("Waiting for a node with 2048 MiB of memory and 1 CPU unreserved for this job's worker", later=True)
TOO_BIG = NoRoom("No node of the cluster has 9000 MiB of memory and 1 CPU in all", later=False)


def _new_job(platform: Platform) -> str:
    data = "\n".join(json.dumps(r) for r in ROWS).encode()
    record, _ = platform.files.create(
        tenant="default", purpose="fine-tune", filename="t.jsonl", chunks=[data], max_bytes=1 << 20
    )
    return platform.jobs.create(tenant="default", body={"model": "tiny-chat", "training_file": record.id}).id


def _messages(platform: Platform, job_id: str) -> list[str]:
    return [e["message"] for e in platform.jobs.events("default", job_id, limit=100)[0]]


def test_a_job_waits_in_the_queue_while_no_node_has_room(loaded_platform: Platform) -> None:
    p = loaded_platform
    launcher = _Launcher([BUSY, BUSY, NODE_2])
    supervisor = JobSupervisor(p.jobs, p.training_quota, p.settings, launcher=launcher)
    job_id = _new_job(p)
    supervisor.tick()
    supervisor.tick()
    job = p.jobs.get(None, job_id)
    assert job.status is JobStatus.QUEUED and job.attempts == 0  # not claimed: no attempt spent
    assert supervisor.placements == {} and launcher.started == []
    assert _messages(p, job_id).count(BUSY.reason) == 1  # said once, not at every tick
    supervisor.tick()
    assert [(j, placement) for j, placement, _ in launcher.started] == [(job_id, NODE_2)]
    assert supervisor.placements == {job_id: NODE_2}
    assert "Fine-tuning job started (attempt 1) on node 10.0.0.2" in _messages(p, job_id)


def test_a_job_too_big_for_every_node_stays_queued_and_holds_up_no_other(loaded_platform: Platform) -> None:
    p = loaded_platform
    big, small = _new_job(p), _new_job(p)
    launcher = _Launcher([TOO_BIG, NODE_2, TOO_BIG])
    settings = p.settings.model_copy(update={"max_concurrent_jobs": 4})
    supervisor = JobSupervisor(p.jobs, p.training_quota, settings, launcher=launcher)
    supervisor.tick()
    assert [j for j, _, _ in launcher.started] == [small]  # the job behind it started meanwhile
    supervisor.tick()
    job = p.jobs.get(None, big)
    assert job.status is JobStatus.QUEUED and job.attempts == 0  # never failed, no attempt spent
    assert _messages(p, big).count(TOO_BIG.reason) == 1
    # A job that only waits for room holds the ones behind it: the queue keeps its order.
    waiting, behind = _new_job(p), _new_job(p)
    launcher.offers = [TOO_BIG, BUSY]
    supervisor.tick()
    assert p.jobs.get(None, behind).status is JobStatus.QUEUED and launcher.offers == []
    assert BUSY.reason in _messages(p, waiting)


def test_a_worker_lost_with_its_node_resumes_elsewhere_and_only_the_new_attempt_counts(
    loaded_platform: Platform,
) -> None:
    p = loaded_platform
    launcher = _Launcher([NODE_2, HEAD])
    supervisor = JobSupervisor(p.jobs, p.training_quota, p.settings, launcher=launcher)
    job_id = _new_job(p)
    supervisor.tick()
    ((_, _, lost),) = launcher.started
    lost.code = -9  # Ray reported its actor dead with its node
    supervisor.tick()  # settles it (queued again) and starts it on the node offered next
    messages = _messages(p, job_id)
    assert "Worker exited unexpectedly (-9) on node 10.0.0.2; resuming from the last checkpoint" in messages
    assert "Fine-tuning job started (attempt 2) on node 10.0.0.1" in messages
    assert [placement for _, placement, _ in launcher.started] == [NODE_2, HEAD]
    assert launcher.attempts == [1, 2]  # each worker is told the attempt it was claimed for
    assert supervisor.placements == {job_id: HEAD}
    # the lease: the first attempt's worker, were it still alive somewhere, is told it lost the job
    assert p.jobs.heartbeat(job_id, 1) == StopRequest.LOST
    assert p.jobs.heartbeat(job_id, 2) is None
    assert p.jobs.get(None, job_id).status is JobStatus.RUNNING


def test_the_ray_launcher_places_on_the_alive_nodes_unreserved_resources() -> None:
    pytest.importorskip("ray", reason="the Ray launcher needs the ray extra")
    from llmos.cluster.jobs import LOST_NODE_PAUSE_S, RayJobLauncher
    from llmos.cluster.view import NodeView
    from llmos.config import Settings

    nodes = [
        NodeView("head", "10.0.0.1", True, {"CPU": 4.0}, {"CPU": 4.0, "memory": 8.0 * GB}),
        NodeView("gone", "10.0.0.2", False, {"CPU": 8.0}, None),
        NodeView("busy", "10.0.0.3", True, {"CPU": 2.0}, {"CPU": 0.0, "memory": 8.0 * GB}),
        NodeView("free", "10.0.0.4", True, {"CPU": 2.0}, {"CPU": 2.0, "memory": 4.0 * GB}),
    ]
    settings = Settings(ray_job_cpus=2, ray_job_memory_mb=4096)
    now = [0.0]
    launcher = RayJobLauncher(settings, nodes=lambda: nodes, server_node=lambda: "head", clock=lambda: now[0])
    job: Any = types.SimpleNamespace(method={})  # no estimate of its own: ray_job_memory_mb
    four_gb = 4 * GB
    assert launcher.place(job) == Placement("free", "10.0.0.4", four_gb)
    # A worker lost there: Ray may not have declared the node dead yet, so it gets no job for a while.
    launcher.node_lost("free")
    assert launcher.place(job) == Placement("head", "10.0.0.1", four_gb)
    now[0] += LOST_NODE_PAUSE_S
    assert launcher.place(job) == Placement("free", "10.0.0.4", four_gb)
    nodes[3] = NodeView("free", "10.0.0.4", True, {"CPU": 2.0}, {"CPU": 2.0, "memory": 3.0 * GB})
    assert launcher.place(job) == Placement("head", "10.0.0.1", four_gb)
    nodes[0] = NodeView("head", "10.0.0.1", True, {"CPU": 4.0}, {"CPU": 1.0, "memory": 8.0 * GB})
    assert isinstance(launcher.place(job), NoRoom)


def test_the_ray_launcher_reserves_each_jobs_own_estimate() -> None:
    """A big job is not placed on a node with too little memory unreserved but on one with room; a
    small one takes the node with the most free CPUs; one too big for every node waits, saying so."""
    pytest.importorskip("ray", reason="the Ray launcher needs the ray extra")
    from llmos.cluster.jobs import RayJobLauncher
    from llmos.cluster.view import NodeView
    from llmos.config import Settings

    nodes = [
        NodeView("head", "10.0.0.1", True, {"CPU": 4.0, "memory": 16.0 * GB}, {"CPU": 4.0, "memory": 16.0 * GB}),
        NodeView("small", "10.0.0.2", True, {"CPU": 8.0, "memory": 4.0 * GB}, {"CPU": 8.0, "memory": 4.0 * GB}),
        NodeView("large", "10.0.0.3", True, {"CPU": 2.0, "memory": 12.0 * GB}, {"CPU": 2.0, "memory": 12.0 * GB}),
    ]
    launcher = RayJobLauncher(
        Settings(ray_job_cpus=1, ray_job_memory_mb=2048), nodes=lambda: nodes, server_node=lambda: "head"
    )

    def job(memory: int) -> Any:
        return types.SimpleNamespace(method={"memory_bytes": memory})

    assert launcher.place(job(GB)) == Placement("small", "10.0.0.2", GB)  # the most free CPUs
    assert launcher.place(job(6 * GB)) == Placement("large", "10.0.0.3", 6 * GB)  # not on "small": 4 GB
    nodes[2] = NodeView("large", "10.0.0.3", True, {"CPU": 2.0, "memory": 12.0 * GB}, {"CPU": 2.0, "memory": 5 * GB})
    assert launcher.place(job(6 * GB)) == Placement("head", "10.0.0.1", 6 * GB)  # the server's node, the one with room
    nodes[0] = NodeView("head", "10.0.0.1", True, {"CPU": 4.0, "memory": 16.0 * GB}, {"CPU": 4.0, "memory": GB})
    waits = launcher.place(job(6 * GB))
    assert isinstance(waits, NoRoom) and waits.later  # "large" and "head" are big enough once their jobs end
    assert waits.reason.startswith("Waiting for a node with 6144 MiB of memory and 1 CPU unreserved")
    never = launcher.place(job(20 * GB))
    assert isinstance(never, NoRoom) and not never.later
    assert never.reason.startswith("No node of the cluster has 20480 MiB of memory and 1 CPU in all")


def _starting_on_node_2(p: Platform) -> tuple[JobSupervisor, str, _Worker]:
    """A job placed on node 2 whose actor has not started its worker yet, its last beat (the
    claim's) two minutes old."""
    launcher = _Launcher([NODE_2])
    supervisor = JobSupervisor(p.jobs, p.training_quota, p.settings, launcher=launcher)
    job_id = _new_job(p)
    supervisor.tick()
    ((_, _, worker),) = launcher.started
    worker.started = False
    _last_beat(p, job_id, seconds_ago=120)
    return supervisor, job_id, worker


def _last_beat(p: Platform, job_id: str, *, seconds_ago: int) -> None:
    with p.db.session() as s:
        row = s.get(JobRow, job_id)
        assert row is not None
        row.heartbeat_at = p.jobs.clock() - timedelta(seconds=seconds_ago)


def test_a_worker_still_starting_on_its_node_is_not_judged_silent(loaded_platform: Platform) -> None:
    """An actor that has not yet started the worker (its node busy) cannot beat; its silence counts from its start."""
    p = loaded_platform
    supervisor, job_id, worker = _starting_on_node_2(p)
    supervisor.tick()
    assert worker.code is None and supervisor.placements == {job_id: NODE_2}
    worker.started = True
    supervisor.tick()
    assert worker.code is None  # started just now: its silence counts from here
    supervisor._workers[job_id].started_at = p.jobs.clock() - timedelta(seconds=60)
    _last_beat(p, job_id, seconds_ago=60)  # no beat since: neither the worker's nor its supervisor's
    supervisor.tick()
    assert worker.code == -9  # silent for longer than stale_after since it started: killed


def test_a_worker_its_actor_never_starts_is_beaten_for_then_given_up(loaded_platform: Platform) -> None:
    """While the actor starts the worker, its supervisor beats for the job (another server on the
    database must not settle it as an orphan); past START_WAITS x stale_after it is killed."""
    p = loaded_platform
    supervisor, job_id, worker = _starting_on_node_2(p)
    supervisor.tick()
    assert worker.code is None
    assert job_id not in p.jobs.silent(supervisor.stale_after)  # beaten for: no orphan to another server
    supervisor._workers[job_id].waiting_since = (
        p.jobs.clock() - START_WAITS * supervisor.stale_after - timedelta(seconds=1)
    )
    supervisor.tick()
    assert worker.code == -9  # its actor never started it: given up, and settled as a dead worker next tick


class _FakeRay:
    """Ray's ``wait``, ``get`` and ``kill`` over refs that are ready once given a value (or an error)."""

    def __init__(self) -> None:
        self.values: dict[str, object] = {}
        self.killed: list[object] = []

    def wait(self, refs: list[str], timeout: float | None = None) -> tuple[list[str], list[str]]:
        return [r for r in refs if r in self.values], [r for r in refs if r not in self.values]

    def get(self, ref: str) -> object:
        value = self.values[ref]
        if isinstance(value, Exception):
            raise value
        return value

    def kill(self, actor: object, no_restart: bool = True) -> None:
        self.killed.append(actor)
        self.values["exit"] = self.values.get("exit", _actor_died())  # its pending calls fail


def _actor_died() -> Exception:
    from ray.exceptions import RayActorError

    return RayActorError()


def _ray_worker(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, _FakeRay, list[str]]:
    """A ``RayWorker`` over a fake Ray, and the list its node-lost callback appends to."""
    pytest.importorskip("ray", reason="the Ray launcher needs the ray extra")
    from llmos.cluster import jobs

    fake = _FakeRay()
    for name in ("wait", "get", "kill"):
        monkeypatch.setattr(jobs.ray, name, getattr(fake, name))
    lost: list[str] = []
    return jobs.RayWorker(object(), "exit", "started", lambda: lost.append("node-2")), fake, lost


def test_a_started_call_counts_only_when_it_names_the_workers_process(monkeypatch: pytest.MonkeyPatch) -> None:
    worker, fake, _ = _ray_worker(monkeypatch)
    fake.values["started"] = None  # a call answered without a process id: no worker yet
    assert not worker.started
    fake.values["started"] = 4242
    assert worker.started


def test_the_host_answers_started_only_once_run_has_started_the_worker(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Ray may run an async actor's ``started`` before its ``run``: it waits for the worker."""
    pytest.importorskip("ray", reason="the Ray launcher needs the ray extra")
    from llmos.cluster import jobs

    class _Process:
        pid = 4242

        def poll(self) -> int | None:
            return 0

    launched: list[tuple[Any, ...]] = []

    def start_worker_process(*args: Any) -> _Process:
        launched.append(args)
        return _Process()

    monkeypatch.setattr(jobs, "start_worker_process", start_worker_process)

    async def started_before_run() -> tuple[bool, int]:
        host = jobs.JobWorkerHost()
        asked = asyncio.create_task(host.started())
        await asyncio.sleep(0.01)
        answered_early = asked.done()
        assert await host.run("ftjob-x", 3, {}, str(tmp_path)) == 0
        return answered_early, await asked

    assert asyncio.run(started_before_run()) == (False, 4242)
    assert [args[:2] for args in launched] == [("ftjob-x", 3)]  # the worker is started for its attempt


def test_a_hung_worker_killed_leaves_its_node_open_and_a_lost_actor_does_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hung, fake, lost = _ray_worker(monkeypatch)
    fake.values["started"] = 4242
    hung.kill()  # its heartbeat fell silent: the worker hung, its node is fine
    assert hung.poll() == -9 and lost == []
    gone, fake, lost = _ray_worker(monkeypatch)
    fake.values.update(started=4242, exit=_actor_died())  # Ray lost the actor: its node may be dying
    assert gone.poll() == -9 and lost == ["node-2"]
    never, fake, lost = _ray_worker(monkeypatch)
    never.kill()  # its actor never started it: the node had no room for it, or is gone
    assert never.poll() == -9 and lost == ["node-2"]


def test_the_worker_beats_before_it_imports_the_training_stack(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Importing torch and transformers takes many seconds on a busy node, which its supervisor would
    read as a dead worker: the worker's entry imports neither, and has beaten for its attempt by the
    time the training starts (its last beat here two minutes old before)."""
    entry = "import sys, llmos.training.worker; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    imported = subprocess.run([sys.executable, "-c", entry], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"

    from llmos.training import worker

    p = loaded_platform
    job_id = _new_job(p)
    assert p.jobs.claim(job_id) == 1  # as the supervisor does
    _last_beat(p, job_id, seconds_ago=120)
    silence_at_training: list[timedelta] = []

    def train(settings: object, job_id: str, heartbeat: worker.Heartbeat) -> int:
        with p.db.session() as s:
            row = s.get(JobRow, job_id)
            assert row is not None and row.heartbeat_at is not None
            silence_at_training.append(p.jobs.clock() - row.heartbeat_at.replace(tzinfo=UTC))
        heartbeat.stop()
        return 0

    _worker_training(monkeypatch, p, train)
    assert worker.run(job_id, 1) == 0
    assert silence_at_training[0] < STALE_AFTER


def _worker_training(monkeypatch: pytest.MonkeyPatch, p: Platform, train: Any) -> None:
    """The worker, run in this process for ``p``'s home, trains by ``train`` (no model stack)."""
    from llmos.training import worker

    training = types.ModuleType("llmos.training.job_training")
    training.train = train  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llmos.training.job_training", training)
    monkeypatch.setattr(worker, "_die_with_parent", lambda: None)
    monkeypatch.setenv("LLMOS_HOME", str(p.settings.home))


def test_a_worker_started_for_an_attempt_the_job_has_moved_past_writes_nothing(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its supervisor gave the job up and another claimed it again before this worker's first beat:
    the worker, started for the first attempt, must not adopt the second (and so run the job twice)."""
    from llmos.training import worker

    p = loaded_platform
    job_id = _new_job(p)
    assert p.jobs.claim(job_id) == 1
    assert p.jobs.settle_stopped(job_id, "its worker went silent")
    assert p.jobs.claim(job_id) == 2
    _last_beat(p, job_id, seconds_ago=120)
    with p.db.session() as s:
        before = s.get(JobRow, job_id)
        assert before is not None
        beat_before = before.heartbeat_at
    events_before = _messages(p, job_id)
    trained: list[int] = []

    def train(settings: object, job_id: str, heartbeat: worker.Heartbeat) -> int:
        trained.append(heartbeat.attempt)
        heartbeat.stop()
        return 0

    _worker_training(monkeypatch, p, train)
    assert worker.run(job_id, 1) == EXIT_STOPPED
    assert trained == []
    with p.db.session() as s:
        after = s.get(JobRow, job_id)
        assert after is not None
        assert (after.status, after.attempts, after.heartbeat_at) == (JobStatus.RUNNING, 2, beat_before)
    assert _messages(p, job_id) == events_before
