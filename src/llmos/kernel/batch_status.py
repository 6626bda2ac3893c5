"""A batch's states (OpenAI's) and the one table of moves between them.

Every change of a batch's status goes through ``BatchStore`` (kernel/batches.py), which checks it
here first and makes it with a compare-and-set on the status it read.
"""

from __future__ import annotations

from enum import StrEnum

from llmos.errors import InvalidRequestError


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


TERMINAL = frozenset({BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})

TRANSITIONS: dict[BatchStatus, frozenset[BatchStatus]] = {
    # A runner claims it (its input was checked when it was created), or it is cancelled first.
    BatchStatus.VALIDATING: frozenset({BatchStatus.IN_PROGRESS, BatchStatus.FAILED, BatchStatus.CANCELLING}),
    # Every line answered: its files are written while finalizing. Past its window it expires
    # with what was answered; a cancel stops it the same way.
    BatchStatus.IN_PROGRESS: frozenset(
        {BatchStatus.FINALIZING, BatchStatus.CANCELLING, BatchStatus.EXPIRED, BatchStatus.FAILED}
    ),
    BatchStatus.FINALIZING: frozenset({BatchStatus.COMPLETED, BatchStatus.FAILED}),
    BatchStatus.CANCELLING: frozenset({BatchStatus.CANCELLED}),
    BatchStatus.FAILED: frozenset(),
    BatchStatus.COMPLETED: frozenset(),
    BatchStatus.EXPIRED: frozenset(),
    BatchStatus.CANCELLED: frozenset(),
}

TIMESTAMPS: dict[BatchStatus, str] = {
    BatchStatus.IN_PROGRESS: "in_progress_at",
    BatchStatus.FINALIZING: "finalizing_at",
    BatchStatus.COMPLETED: "completed_at",
    BatchStatus.FAILED: "failed_at",
    BatchStatus.EXPIRED: "expired_at",
    BatchStatus.CANCELLING: "cancelling_at",
    BatchStatus.CANCELLED: "cancelled_at",
}
"""The field of the batch object each state stamps when it is entered."""


class IllegalBatchTransition(InvalidRequestError):
    """A move the table forbids: a 400 when a request asks for it (cancel a finished batch)."""

    def __init__(self, batch_id: str, source: BatchStatus, target: BatchStatus) -> None:
        super().__init__(
            f"batch {batch_id} is {source.value}; it cannot become {target.value}",
            param="batch_id",
            code="invalid_batch_state",
        )


def check_batch_transition(batch_id: str, source: BatchStatus, target: BatchStatus) -> None:
    if target not in TRANSITIONS[source]:
        raise IllegalBatchTransition(batch_id, source, target)
