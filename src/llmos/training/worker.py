"""A training worker process: `python -m llmos.training.worker JOB_ID ATTEMPT`.

Started and watched by the kernel's job supervisor, with the attempt it claimed the job for: the
lease the worker beats with. A worker whose attempt is no longer the job's (its supervisor gave it
up and the job was claimed again before the worker's first beat) exits at once, having written
nothing. It reports heartbeats, events, metrics,
checkpoints and its result through the job store, stops at the next step when asked to cancel
or pause, dies with its supervisor (so a job never runs twice), and registers the fine-tuned
model at the end.

It beats first: this module imports only what a heartbeat needs (settings, the database), and the
training stack (torch, transformers, the trainers: ``job_training``) only after its first beat, with
the heartbeat thread already running. Importing that stack takes many seconds on a busy node, which
would otherwise pass for a silent worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
from datetime import UTC, datetime

from llmos.config import Settings
from llmos.kernel.job_heartbeat import EXIT_STOPPED, beat
from llmos.kernel.job_status import StopRequest
from llmos.registry.db import Database
from llmos.security.private import restrict_umask
from llmos.training.metering import QUOTA_STOP, CpuMeter

log = logging.getLogger("llmos.worker")
HEARTBEAT_S = 2.0


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its supervisor dies (kill -9 included)."""
    with contextlib.suppress(OSError):  # not Linux: the orphan check in Heartbeat still applies
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Heartbeat(threading.Thread):
    """Every few seconds: prove we are alive, and read what the supervisor asks of us. Once the
    platform is open, ``meter`` charges the CPU time used at each beat too."""

    def __init__(self, db: Database, job_id: str, attempt: int, parent: int) -> None:
        super().__init__(daemon=True, name="heartbeat")
        self.db, self.job_id, self.attempt, self.parent = db, job_id, attempt, parent
        self.control: str | None = None
        self.meter: CpuMeter | None = None
        self._stop = threading.Event()

    def beat(self) -> None:
        self.control = beat(self.db, self.job_id, self.attempt, datetime.now(UTC))
        if self.control == StopRequest.LOST or self.meter is None:
            return  # lost: its CPU time from now on is no one's to charge
        if self.meter.charge() is not None and self.control is None:
            self.control = QUOTA_STOP  # the training loop stops at its next step

    def run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if os.getppid() != self.parent:  # orphaned: a restarted server will resume the job
                os._exit(EXIT_STOPPED)
            try:
                self.beat()
            except Exception:  # a busy database must not kill training; the next beat retries
                log.exception("heartbeat failed")

    def stop(self) -> None:
        self._stop.set()
        if self.meter is None:
            return
        try:
            self.meter.charge()  # the CPU time used since the last beat
        except Exception:
            log.exception("could not charge the job's last CPU time")


def run(job_id: str, attempt: int) -> int:
    """Run attempt ``attempt`` of the claimed job ``job_id``; the worker's exit code."""
    _die_with_parent()
    parent = os.getppid()
    settings = Settings()
    db = Database(settings.db_url, run_migrations=False)  # the server that claimed the job migrated it
    heartbeat = Heartbeat(db, job_id, attempt, parent)
    heartbeat.beat()
    if heartbeat.control == StopRequest.LOST:
        db.dispose()
        return EXIT_STOPPED  # the job moved on before this worker started: not ours to run
    heartbeat.start()
    from llmos.training.job_training import train  # the training stack, imported while the heartbeat runs

    try:
        return train(settings, job_id, heartbeat)
    finally:
        db.dispose()


if __name__ == "__main__":
    restrict_umask()  # checkpoints, results and logs are the owner's alone
    logging.basicConfig(level=logging.INFO)
    job_id, attempt = sys.argv[1:3]
    sys.exit(run(job_id, int(attempt)))
