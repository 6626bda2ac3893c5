"""Fine-tuning jobs on a Ray cluster: each job's worker runs on a node with room for it.

``RayJobLauncher`` is the job supervisor's launcher in cluster mode (``kernel.job_workers``). It
chooses a node (``routing.choose_job_node``: room for ``ray_job_cpus``, the job's own memory
estimate, made when it was created (``training.finetune_memory``; ``ray_job_memory_mb`` for a job
without one), and the GPUs it asks for (``job_workers.job_gpus``), in what nothing has reserved
there, a node other than the API server's first) and starts on it, pinned by Ray's node affinity
with that reservation, a ``JobWorkerHost`` actor, which runs the job's worker,
``python -m llmos.training.worker JOB_ID ATTEMPT``, as a local supervisor does. The worker reports
heartbeats, events, checkpoints and its result to the database itself and dies with the actor, so
only its exit code comes back through Ray. An actor that dies with its node is reported by Ray;
the supervisor then settles the job as for any dead worker, and it resumes from its last checkpoint
wherever it is placed next (the checkpoints are in the artifact store, ``kernel.job_checkpoints``).

What crosses to the actor is plain data: the job id, its claimed attempt, the worker's environment
(strings) and its log directory. Ray pickles it within the cluster's trust domain; nothing a client sent is unpickled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from llmos.cluster.pool import cluster_nodes
from llmos.cluster.routing import NodeCapacity, ReplicaNeed, choose_job_node
from llmos.cluster.view import NodeView
from llmos.config import Settings
from llmos.kernel.job_record import Job
from llmos.kernel.job_workers import NoRoom, Placement, job_dir, job_gpus, start_worker_process, worker_env

log = logging.getLogger(__name__)

LOST_EXIT = -9
"""The exit code a worker is given when Ray reports its actor dead: it was killed with the actor
(the worker dies with its parent), whether by its node's end or by ``kill``."""

POLL_S = 0.5
"""How often the host looks at its worker process."""

LOST_NODE_PAUSE_S = 60.0
"""How long a node where a worker was lost gets no job. Ray may report the actor lost (its caller's
connection broke) before it declares the node dead, which takes several failed health checks; an
actor pinned meanwhile to a dead node never starts, and would cost the job an attempt."""


class JobWorkerHost:
    """Made a Ray actor per job by ``RayJobLauncher``. Its methods are coroutines, so Ray serves
    ``terminate`` while ``run`` waits; the worker is started on the actor's event-loop thread, which
    lives as long as the actor (the worker's parent-death signal is tied to the thread that started it)."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self._launched = asyncio.Event()

    async def run(self, job_id: str, attempt: int, env: dict[str, str], log_dir: str) -> int:
        """Start the worker of the job's ``attempt`` with ``env`` over this actor's environment; its
        exit code. That environment holds the ``CUDA_VISIBLE_DEVICES`` Ray set for the GPUs it gave
        the actor (none: empty), which ``env`` never names, so the worker sees those GPUs only."""
        self.process = start_worker_process(job_id, attempt, {**os.environ, **env}, Path(log_dir))
        self._launched.set()
        while (code := self.process.poll()) is None:
            await asyncio.sleep(POLL_S)
        return code

    async def started(self) -> int:
        """The worker's process id, answered once ``run`` has started it: Ray need not run an async
        actor's calls in the order they were sent, so this may be called before ``run``."""
        await self._launched.wait()
        assert self.process is not None
        return self.process.pid

    async def terminate(self) -> None:
        if self.process is not None:
            self.process.terminate()


class RayWorker:
    """A job's worker on the cluster, watched as ``subprocess.Popen`` watches a local one."""

    def __init__(self, host: Any, exit_ref: Any, started_ref: Any, on_lost: Callable[[], None]) -> None:
        self.host = host
        self.exit_ref = exit_ref
        self.started_ref = started_ref
        self.on_lost = on_lost
        self._code: int | None = None
        self._pid: int | None = None
        self._killed_running = False
        """Its supervisor killed it after it had started (it hung): its actor's end is no sign of its node's."""

    @property
    def pid(self) -> int | None:
        return None  # on another node; its node is the placement's

    def poll(self) -> int | None:
        if self._code is None and ray.wait([self.exit_ref], timeout=0)[0]:
            self._code = self._exit_code()
        return self._code

    def _exit_code(self) -> int:
        try:
            code = int(ray.get(self.exit_ref))
        except RayError as exc:  # the actor died (its node, its process) or could not be placed
            log.warning("a job worker's Ray actor was lost: %s", exc)
            if not self._killed_running:
                self.on_lost()
            code = LOST_EXIT
        ray.kill(self.host, no_restart=True)  # its reservation is free for the next job
        return code

    def terminate(self) -> None:
        self.host.terminate.remote()

    def kill(self) -> None:
        """Kill its actor, and the worker with it. A worker that had started and is killed (its
        heartbeat fell silent) says nothing against its node, which stays open to jobs; one its actor
        never started does (the node had no room for it, or is gone), as does an actor Ray lost."""
        self._killed_running = self.started
        ray.kill(self.host, no_restart=True)

    def wait(self, timeout: float | None = None) -> int:
        if not ray.wait([self.exit_ref], timeout=timeout)[0]:
            raise subprocess.TimeoutExpired("job worker actor", timeout or 0.0)
        code = self.poll()
        assert code is not None
        return code

    @property
    def started(self) -> bool:
        """Its actor has started the worker process (until then it cannot send heartbeats, and Ray's
        per-node figures may not count its reservation yet): ``started`` answered with its process
        id, or it has ended."""
        if self._pid is None and ray.wait([self.started_ref], timeout=0)[0]:
            with contextlib.suppress(RayError):  # the actor is gone: ``poll`` says so
                self._pid = ray.get(self.started_ref)
        return self._pid is not None or self.poll() is not None


@dataclass
class _Start:
    node_id: str
    worker: RayWorker
    memory_bytes: int
    gpus: float


def _this_node() -> str:
    return str(ray.get_runtime_context().get_node_id())


class RayJobLauncher:
    def __init__(
        self,
        settings: Settings,
        *,
        nodes: Callable[[], list[NodeView]] = cluster_nodes,
        server_node: Callable[[], str] = _this_node,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self._nodes = nodes
        self._server_node = server_node
        self._clock = clock
        self._starting: list[_Start] = []
        self._lost: dict[str, float] = {}
        """Node id -> when a worker there was last lost."""
        self._host_class = ray.remote(JobWorkerHost)

    def need(self, job: Job) -> ReplicaNeed:
        """What ``job``'s worker reserves: ``ray_job_cpus``, the peak memory estimated for it when
        it was created (``ray_job_memory_mb`` for a job without an estimate: its model's shapes
        could not be read, or it was queued before jobs had one), and the GPUs it asks for."""
        estimate = job.method.get("memory_bytes")
        if isinstance(estimate, bool) or not isinstance(estimate, int) or estimate <= 0:
            estimate = self.settings.ray_job_memory_mb << 20
        return ReplicaNeed(cpus=self.settings.ray_job_cpus, memory_bytes=estimate, gpus=job_gpus(job, self.settings))

    def place(self, job: Job) -> Placement | NoRoom:
        self._starting = [s for s in self._starting if not s.worker.started]
        now = self._clock()
        self._lost = {node: at for node, at in self._lost.items() if now - at < LOST_NODE_PAUSE_S}
        alive = [n for n in self._nodes() if n.alive and n.available is not None]
        need, server = self.need(job), self._server_node()
        node = choose_job_node([self._free(n) for n in alive if n.node_id not in self._lost], need, server)
        if node is not None:
            return Placement(node.node_id, node.address, memory_bytes=need.memory_bytes, gpus=need.gpus)
        parts = [f"{need.memory_bytes / 2**20:.0f} MiB of memory", f"{need.cpus:g} CPU"]
        parts += [f"{need.gpus:g} GPU"] if need.gpus else []
        wanted = f"{', '.join(parts[:-1])} and {parts[-1]}"
        if choose_job_node([_total(n) for n in alive], need, server) is not None:
            return NoRoom(f"Waiting for a node with {wanted} unreserved for this job's worker", later=True)
        return NoRoom(
            f"No node of the cluster has {wanted} in all, which this job's worker needs: it stays queued "
            "until a node that large joins",
            later=False,
        )

    def node_lost(self, node_id: str) -> None:
        """A worker on ``node_id`` was lost: no job goes there for ``LOST_NODE_PAUSE_S``."""
        self._lost[node_id] = self._clock()

    def _free(self, node: NodeView) -> NodeCapacity:
        """What nothing has reserved on ``node``: Ray's figure, less the workers started there that
        Ray may not count yet."""
        available = node.available or {}
        pending = [s for s in self._starting if s.node_id == node.node_id]
        return NodeCapacity(
            node.node_id,
            node.address,
            cpus=available.get("CPU", 0.0) - len(pending) * self.settings.ray_job_cpus,
            memory_bytes=int(available.get("memory", 0)) - sum(s.memory_bytes for s in pending),
            gpus=available.get("GPU", 0.0) - sum(s.gpus for s in pending),
        )

    def start(self, job_id: str, attempt: int, placement: Placement) -> RayWorker:
        assert placement.node_id is not None, "a Ray placement names its node"
        options: dict[str, Any] = {
            "num_cpus": self.settings.ray_job_cpus,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(placement.node_id, soft=False),
            "max_restarts": 0,  # the supervisor resumes the job; Ray must not run it a second time
            "namespace": "llmos",
        }
        if placement.memory_bytes:
            options["memory"] = placement.memory_bytes
        if placement.gpus:
            options["num_gpus"] = placement.gpus
        host: Any = self._host_class.options(**options).remote()  # Ray's handle types no coroutine methods
        exit_ref = host.run.remote(job_id, attempt, self._env(), str(job_dir(self.settings, job_id)))
        worker = RayWorker(host, exit_ref, host.started.remote(), partial(self.node_lost, placement.node_id))
        self._starting.append(_Start(placement.node_id, worker, placement.memory_bytes, placement.gpus))
        return worker

    def _env(self) -> dict[str, str]:
        """The server's own ``LLMOS_*`` settings, as a local worker inherits them, and the threads the
        reservation pays for."""
        env = worker_env(self.settings, {k: v for k, v in os.environ.items() if k.startswith("LLMOS_")})
        env.setdefault("OMP_NUM_THREADS", str(max(1, math.floor(self.settings.ray_job_cpus))))
        return env


def _total(node: NodeView) -> NodeCapacity:
    """All of ``node``'s resources, as if nothing ran there."""
    return NodeCapacity(
        node.node_id,
        node.address,
        cpus=node.resources.get("CPU", 0.0),
        memory_bytes=int(node.resources.get("memory", 0)),
        gpus=node.resources.get("GPU", 0.0),
    )
