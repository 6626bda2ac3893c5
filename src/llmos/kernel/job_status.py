"""A fine-tuning job's states and the one table of moves between them.

OpenAI's states (validating_files, queued, running, succeeded, failed, cancelled) plus paused.
Every change of a job's status goes through ``JobStore`` (kernel/jobs.py), which checks it here
first; a move the table does not list raises ``IllegalTransition``.
"""

from __future__ import annotations

from enum import StrEnum

from llmos.errors import InvalidRequestError


class JobStatus(StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class StopRequest(StrEnum):
    """Why a running job's worker must stop: the API asked (its supervisor carries it out), or
    the job is no longer the worker's to run."""

    CANCEL = "cancel"
    PAUSE = "pause"
    LOST = "lost"
    """The worker's heartbeat had fallen silent so long that a supervisor settled its job; it
    stops without touching the job again."""


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
"""States a job only leaves by ``resume`` (failed, for a resumable cause) or never."""

RESUMABLE_ERRORS = frozenset({"disk_full", "quota_exceeded"})
"""A job failed for one of these can be resumed (from its last checkpoint) once the cause is gone."""

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.VALIDATING_FILES: frozenset({JobStatus.QUEUED, JobStatus.FAILED, JobStatus.CANCELLED}),
    # A supervisor claims it; the API pauses or cancels it before it starts.
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.CANCELLED}),
    # Its worker finishes or fails it; its supervisor carries out a cancel or pause, or queues it
    # again when the worker died or its server stopped (it resumes from its last checkpoint).
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED, JobStatus.QUEUED}
    ),
    JobStatus.PAUSED: frozenset({JobStatus.QUEUED, JobStatus.CANCELLED}),
    # Only for RESUMABLE_ERRORS: the store checks the cause.
    JobStatus.FAILED: frozenset({JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class IllegalTransition(InvalidRequestError):
    """A move the table forbids: a 400 when a request asks for it (cancel a finished job, say)."""

    def __init__(self, job_id: str, source: JobStatus, target: JobStatus) -> None:
        super().__init__(
            f"job {job_id} is {source.value}; it cannot become {target.value}",
            param="fine_tuning_job_id",
            code="invalid_job_state",
        )
        self.source, self.target = source, target


def check_transition(job_id: str, source: JobStatus, target: JobStatus) -> None:
    """Raise ``IllegalTransition`` unless the table allows ``source -> target``."""
    if target not in TRANSITIONS[source]:
        raise IllegalTransition(job_id, source, target)
