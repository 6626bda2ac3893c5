"""Where and how a claimed job's worker runs: the supervisor asks a launcher for a place before it
claims a job, then starts the job's worker there and watches it through ``WorkerProcess``.

One entry point runs every job: ``python -m llmos.training.worker JOB_ID ATTEMPT``
(``start_worker_process``), given the attempt its supervisor claimed, so a worker never takes over
an attempt claimed after its own.
The default launcher starts it as a child of the API server; in Ray cluster mode
``cluster.jobs.RayJobLauncher`` starts the same command on a node with room for it, from a Ray actor
there, so a job behaves alike wherever it runs (heartbeats, events, checkpoints and resume).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from llmos.config import Settings
from llmos.kernel.job_record import Job


class WorkerProcess(Protocol):
    """A job's running worker, as ``subprocess.Popen`` shows a local one."""

    @property
    def pid(self) -> int | None:
        """Its process id on its node (None: not known to the supervisor)."""

    def poll(self) -> int | None:
        """Its exit code once it ended, else None."""

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def wait(self, timeout: float | None = None) -> int:
        """Its exit code; ``subprocess.TimeoutExpired`` if it still runs after ``timeout``."""


@dataclass(frozen=True)
class Placement:
    node_id: str | None = None
    """The cluster node the worker runs on; None: the API server's own machine."""
    node_address: str | None = None
    """That node's address, as the job's events name it."""
    memory_bytes: int = 0
    """The memory reserved for the worker there (0: none, as for a child of the API server)."""
    gpus: float = 0.0
    """The GPUs reserved for the worker there (Ray's ``num_gpus``; 0: none, as for a child of the
    API server, which sees whatever GPUs its machine has)."""


LOCAL = Placement()


@dataclass(frozen=True)
class NoRoom:
    """Why no node takes a job now: it stays queued (no attempt spent), and its events say why."""

    reason: str
    later: bool
    """Some node has room for it once what runs there ends, so the jobs queued behind it wait their
    turn; False: no node is that large at all, and they may start meanwhile."""


class WorkerLauncher(Protocol):
    def place(self, job: Job) -> Placement | NoRoom:
        """Where ``job``'s worker would start now, or why nowhere has room (the job stays queued)."""

    def start(self, job_id: str, attempt: int, placement: Placement) -> WorkerProcess:
        """Start the worker of ``job_id``, claimed already for ``attempt``, at ``placement``."""


def job_dir(settings: Settings, job_id: str) -> Path:
    """A job's work directory on the node running its worker (checkpoints as they are written, the
    result, the worker's log). Nothing in it is needed elsewhere: a resume restores the checkpoints
    from the artifact store (``kernel.job_checkpoints``)."""
    return settings.home / "jobs" / job_id


def job_gpus(job: Job, settings: Settings) -> float:
    """The GPUs ``job``'s worker asks for: those its method holds (its own ``method.<type>.gpus``,
    else the server's ``ray_job_gpus`` written there at creation); for a job queued before jobs held
    them, ``settings.ray_job_gpus``."""
    asked = job.method.get("resolved", {}).get("gpus")
    return settings.ray_job_gpus if asked is None else float(asked)


def worker_env(settings: Settings, base: Mapping[str, str]) -> dict[str, str]:
    """The environment a worker gets: ``base`` with the settings that locate the platform's data
    (its home, database and artifact store) and bound its threads, which it reads back with ``Settings()``."""
    env = {**base, "LLMOS_HOME": str(settings.home)}
    if settings.database_url:
        env["LLMOS_DATABASE_URL"] = settings.database_url
    if settings.artifact_store:
        env["LLMOS_ARTIFACT_STORE"] = settings.artifact_store
    if settings.s3_endpoint_url:
        env["LLMOS_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    if settings.training_threads:
        env["OMP_NUM_THREADS"] = str(settings.training_threads)
    return env


def start_worker_process(job_id: str, attempt: int, env: Mapping[str, str], log_dir: Path) -> subprocess.Popen[bytes]:
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / "worker.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "llmos.training.worker", job_id, str(attempt)],
            env=dict(env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def spawn_worker(job_id: str, attempt: int, settings: Settings) -> subprocess.Popen[bytes]:
    """The worker of ``job_id``'s ``attempt`` as a child of this process, with this process's environment."""
    return start_worker_process(job_id, attempt, worker_env(settings, os.environ), job_dir(settings, job_id))


Spawn = Callable[[str, int, Settings], WorkerProcess]
"""Starts a local worker: job id, claimed attempt, settings (``spawn_worker``; tests give their own)."""


class LocalLauncher:
    """Workers as children of the API server, on its machine (the laptop default)."""

    def __init__(self, settings: Settings, spawn: Spawn = spawn_worker) -> None:
        self.settings = settings
        self.spawn = spawn

    def place(self, job: Job) -> Placement:
        return LOCAL

    def start(self, job_id: str, attempt: int, placement: Placement) -> WorkerProcess:
        return self.spawn(job_id, attempt, self.settings)


def default_launcher(settings: Settings, spawn: Spawn = spawn_worker) -> WorkerLauncher:
    """Ray cluster mode's launcher where ``ray_address`` is set, else local processes."""
    if settings.ray_address is not None:
        from llmos.cluster.jobs import RayJobLauncher  # only cluster mode needs Ray

        return RayJobLauncher(settings)
    return LocalLauncher(settings, spawn)
