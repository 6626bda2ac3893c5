"""Preemption on the torch backend: when the running rows outgrow the key/value budget, the
youngest request gives its cache back and is prefilled again later (recompute), never failed.

Admission counts what the held rows take now, with a little room to grow
(``ADMISSION_HEADROOM``), not the prompt plus ``max_tokens`` each may reach, so far more
requests run at once than full reservations would let in; the price is that the rows may
outgrow the budget. Before every step, ``make_room`` checks that everything held still fits
once the step has run (each decoding row one token longer, the parked rows, the prompts being
prefilled at their full length); while it does not, the youngest request (a batch's background
lines before any interactive request) is preempted: its rows leave the batch and their cache is
freed, a prompt of it still being prefilled is dropped, and each of its rows is queued again,
first in its share's line, as a one-row request whose prompt is the request's prompt followed by
the row's output so far. Prefilled again, the row goes on where it stopped: the same stream,
text, logprobs, grammar state, seeded generator and token counts.

Recompute rather than moving the states aside: on a CPU the cache already lives in host memory,
and what ran out is the budget, not a device's memory. The oldest request is never preempted:
it fits the budget alone (``check_fits`` refused any that does not), so preempting the others
always makes room for it, and nothing is failed for want of memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import replace

import torch

from llmos.engine.scheduler import Pending, Resume, Row, Scheduler
from llmos.engine.torch_backend.batch_state import BatchState
from llmos.engine.torch_backend.kv_budget import KvBudget
from llmos.engine.torch_backend.prefill import Prefill

ADMISSION_HEADROOM = 32
"""Steps of growth every held row and a newcomer's prompt must have room for at admission: a
request admitted into a nearly full budget would be the youngest, preempted at once, admitted
again, and so on."""


def _live(batch: BatchState[Row] | None) -> list[tuple[int, Row]]:
    return [(i, row) for i, row in enumerate(batch.rows) if not row.finished] if batch is not None else []


def held_rows(
    running: BatchState[Row] | None, parked: BatchState[Row] | None, jobs: Iterable[Prefill]
) -> list[tuple[Pending, int]]:
    """Every held row's request and the cache tokens it takes once the next step has run: a
    decoding row one more than now, a parked row what it has, a prompt being prefilled its whole
    length and its first token; never more than its reservation (rows that finished leave before
    the step grows the cache)."""
    rows: list[tuple[Pending, int]] = []
    for batch, grows in ((running, 1), (parked, 0)):
        if batch is not None:
            positions = batch.next_pos.tolist()
            rows += [(row.pending, positions[i] + grows) for i, row in _live(batch)]
    for job in jobs:
        rows += [(job.pending, job.lead + len(job.prompt) + 1)] * job.pending.rows
    return [(pending, min(pending.reserve, size)) for pending, size in rows]


def held_sizes(running: BatchState[Row] | None, parked: BatchState[Row] | None, jobs: Iterable[Prefill]) -> list[int]:
    return [size for _, size in held_rows(running, parked, jobs)]


class Preemption:
    def __init__(self, budget: KvBudget, scheduler: Scheduler) -> None:
        self.budget = budget
        self.scheduler = scheduler
        self.count = 0
        """Requests preempted (each counted once however many rows it had)."""

    def make_room(self, running: BatchState[Row] | None, parked: BatchState[Row] | None, jobs: deque[Prefill]) -> None:
        """Preempt the youngest requests until what is held fits the budget after the next step.
        Rows leave ``running`` and ``parked`` (either may be left with none) and prompts leave
        ``jobs``; each goes back to the scheduler's queue."""
        while not self.budget.fits(held_sizes(running, parked, jobs)):
            victim = self._youngest(running, parked, jobs)
            if victim is None:
                return
            requeue = [*self._take(victim, running), *self._take(victim, parked)]
            for job in [job for job in jobs if job.pending.request.request_id == victim]:
                jobs.remove(job)
                requeue.append(job.pending)  # its rows have not started: queued again as it was
            for pending in reversed(requeue):  # put back in front of the line, first row first
                self.scheduler.queue.put_back(pending.share, pending)
            self.count += 1

    @staticmethod
    def _youngest(
        running: BatchState[Row] | None, parked: BatchState[Row] | None, jobs: Iterable[Prefill]
    ) -> str | None:
        """The request to preempt: background work first, then the latest arrival; None when only
        one request is held (it fits alone)."""
        held: dict[str, Pending] = {row.pending.request.request_id: row.pending for _, row in _live(running)}
        held |= {row.pending.request.request_id: row.pending for _, row in _live(parked)}
        held |= {job.pending.request.request_id: job.pending for job in jobs}
        if len(held) < 2:
            return None
        return max(held, key=lambda rid: (held[rid].request.background, held[rid].queued_at))

    @staticmethod
    def _take(request_id: str, batch: BatchState[Row] | None) -> list[Pending]:
        """Remove ``request_id``'s rows from ``batch`` (their cache freed), each as a one-row
        request that resumes it, keeping its sampling row (the seeded generator where it stands)
        and token counts."""
        if batch is None:
            return []
        gone = [i for i, row in _live(batch) if row.pending.request.request_id == request_id]
        resumed = []
        for i in gone:
            row, one = batch.rows[i], torch.tensor([i])
            counts = batch.counts[one].clone() if batch.counts is not None else None
            row.chosen = None  # streamed already: its prompt now ends with it
            resumed.append(replace(row.pending, resume=Resume(row, (batch.sampling.select(one), counts))))
        if gone:
            batch.select([i for i in range(len(batch.rows)) if i not in gone])
        return resumed
