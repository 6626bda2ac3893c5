"""One scheduler for every generation backend: admission, aborts and tenant shares.

Each chat model's engine loop has vLLM v1's shape: *schedule* (admit waiting requests from the
fair queue within the batch's rows, the backend's key/value reservations and each tenant's share;
take aborts; decide which rows decode and which are parked) -> *execute* (the backend's prefill
chunk and decode step) -> *update* (stream each row's token, retire finished rows). This module
is the schedule part, free of tensors and threads, so it is tested without a model;
``engine.runner.GenerationRunner`` runs the loop, and a backend supplies only its reservation,
prefill and step.

The contract a backend relies on:
- ``admit`` returns requests in tenant round-robin order; each fits with every row already held
  (``fits`` of what every held row takes and what the newcomer's rows take, ``size``: by default
  their reservations) unless nothing is held (a request that fits alone always runs);
  a tenant at its cap is passed over, not blocked behind; the first request that does not fit
  stops admission (it waits, first in its tenant's line, for rows to finish).
- An aborted request is never admitted: it is ended with its abort where it is taken.
- ``shares`` parks the latest admitted rows of a tenant over its cap and resumes parked rows,
  earliest first, as soon as the caps and the batch's rows allow.
- Background requests (a batch's lines) share one line, ``BACKGROUND``, whose cap is the rows
  that interactive requests have not needed lately (their peak demand over ``recent_s``) less a
  quarter of the batch kept free: they fill spare rows and are parked when interactive demand
  grows; a client that keeps sending never finds its row taken, and a new one finds rows free
  (parked rows still hold their place in the batch, so a row taken would be lost until it ends).
- A preempted row (its cache given back when the budget ran out, ``Resume``) is queued again first
  in its share's line, with the arrival time of its request, and is admitted like any request;
  it ends like the row it is (its own choice index), whether aborted, failed or closed.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmos.engine.choices import abort_delta, error_delta
from llmos.engine.detokenize import IncrementalText
from llmos.engine.grammar import RowMatcher
from llmos.engine.protocol import GenerationDelta, GenerationRequest, TokenLogprob
from llmos.engine.threads import IDLE_EXIT_S
from llmos.kernel.fair_queue import Empty, FairQueue
from llmos.kernel.fair_share import row_caps

Sink = Callable[[GenerationDelta], None]
RECENT_S = 2.0
"""A tenant seen this recently still counts as active, so the gap between one client's sequential
requests does not let a flood back into the whole batch."""
_CLOSE = "\0close"  # the queue "tenant" of the sentinel that wakes the loop at close; never a real tenant
BACKGROUND = "\0background"
"""The share every background request counts against (never a real tenant's name)."""


@dataclass
class Pending:
    """A request queued for, or being prefilled by, one runner."""

    request: GenerationRequest
    sink: Sink
    reserve: int
    """Cache tokens each of its choices may grow to: its prompt (and virtual tokens) plus ``max_tokens``."""
    adapter: str | None = None
    """The LoRA adapter applied to its rows (torch backend)."""
    virtual: Any = None
    """The prefix- or prompt-tuning adapter whose states go before its prompt (torch backend)."""
    queued_at: float = field(default_factory=time.monotonic)
    """When it was queued (its queue time is observed at admission); a preempted row keeps its request's."""
    resume: Resume | None = None
    """The preempted row this continues (a one-row request whose prompt goes on with its output)."""

    @property
    def tenant(self) -> str:
        return self.request.tenant

    @property
    def share(self) -> str:
        """Whose rows it counts against: its tenant's, or the background's."""
        return BACKGROUND if self.request.background else self.request.tenant

    @property
    def rows(self) -> int:
        return 1 if self.resume is not None else self.request.params.n

    @property
    def prompt(self) -> list[int]:
        """The tokens to prefill: its prompt, and a preempted row's output so far after it."""
        prompt = list(self.request.prompt_token_ids)
        return prompt + self.resume.row.output_ids if self.resume is not None else prompt

    @property
    def scope(self) -> str:
        """Whose cached prompt states this request may reuse: its tenant's, under the same adapter."""
        adapter = self.adapter or (self.virtual.adapter_id if self.virtual is not None else "")
        return f"{self.request.tenant}\0{adapter}"

    def end(self, delta: Callable[[int], GenerationDelta]) -> None:
        """End every choice with ``delta(index)`` (its abort or its error); a preempted row ends alone."""
        if self.resume is not None:
            self.resume.row.end(delta(self.resume.row.index))
            return
        for i in range(self.request.params.n):
            self.sink(delta(i))

    def fail(self, exc: Exception) -> None:
        """End every choice with an error saying ``exc``."""
        self.end(lambda i: error_delta(i, exc))


@dataclass
class Row:
    """One choice of a request in the running batch."""

    pending: Pending
    index: int
    text: IncrementalText
    generated: int = 0
    finished: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)
    held_ids: list[int] = field(default_factory=list)
    """Tokens whose text is held back (a partial character or a possible stop sequence)."""
    chosen: int | None = None
    """Its next token when already chosen and streamed: the first, right after its prefill."""
    grammar: RowMatcher | None = None
    """Where it stands in its request's grammar (made at its first token), if constrained."""
    output_ids: list[int] = field(default_factory=list)
    """Every token streamed so far (what a preempted row's prompt goes on with when it is prefilled again)."""
    drafted: int = 0
    """Draft tokens verified for it (speculative decoding) not yet reported in a delta."""
    draft_accepted: int = 0
    """Draft tokens streamed as its output not yet reported in a delta."""

    @property
    def tenant(self) -> str:
        return self.pending.request.tenant

    @property
    def share(self) -> str:
        return self.pending.share

    def end(self, delta: GenerationDelta) -> None:
        """Finish this row with ``delta`` (unless it has finished already)."""
        if not self.finished:
            self.finished = True
            self.pending.sink(delta)


@dataclass
class Resume:
    """A row preempted mid-generation: its stream's state (text, logprobs, grammar, output) and
    what the backend keeps of it while its cache is recomputed (``saved``: the torch backend's
    sampling row, whose seeded generator stands where it stopped, and its token counts)."""

    row: Row
    saved: Any = None


class Scheduler:
    def __init__(self, max_rows: int, batch_wait_s: float, light_rows: int, recent_s: float = RECENT_S) -> None:
        self.max_rows = max_rows
        self.batch_wait_s = batch_wait_s
        self.light_rows = light_rows
        self.recent_s = recent_s
        self.queue: FairQueue[Pending | None] = FairQueue()
        self.closing = False
        self._aborted: set[str] = set()
        self._abort_lock = threading.Lock()
        self._seen: dict[str, float] = {}
        self._interactive_peaks: deque[tuple[float, int]] = deque()
        """(time, interactive rows wanted) with falling rows: its head is the peak over ``recent_s``."""
        self.parks = 0  # rows ever parked

    # -- called from other threads ---------------------------------------------------------
    def put(self, pending: Pending) -> None:
        self.queue.put(pending.share, pending)

    def wake(self) -> None:
        """Wake a loop waiting for work (at close)."""
        self.queue.put(_CLOSE, None)

    def abort(self, request_id: str) -> None:
        with self._abort_lock:
            self._aborted.add(request_id)

    # -- the engine thread -----------------------------------------------------------------
    def take_aborted(self, ids: Callable[[], Iterable[str]]) -> set[str]:
        """The aborted ones among ``ids()`` (asked only when an abort is pending), forgotten here;
        aborted requests still queued are taken out and ended."""
        if not self._aborted:  # read without the lock: a new abort is seen next iteration
            return set()
        with self._abort_lock:
            aborted = set(self._aborted)
        queued = self.queue.remove(lambda p: p is not None and p.request.request_id in aborted)
        for pending in queued:
            assert pending is not None
            pending.end(abort_delta)  # still queued: it ends now, not when rows free up for it
        # A request may be queued and held at once (some of its rows preempted): both parts end.
        # On this thread every unfinished request is queued or held, so the rest have finished.
        with self._abort_lock:
            self._aborted -= aborted
        return aborted & set(ids())

    def _take_abort(self, request_id: str) -> bool:
        """Whether ``request_id`` was aborted; if so, its other parts still queued (preempted rows)
        end too (``take_aborted`` ends the parts held, and forgets the abort)."""
        with self._abort_lock:
            if request_id not in self._aborted:
                return False
        for pending in self.queue.remove(lambda p: p is not None and p.request.request_id == request_id):
            assert pending is not None
            pending.end(abort_delta)
        return True

    def queued(self, wanted: Callable[[GenerationRequest], bool]) -> bool:
        """Whether a request for which ``wanted`` holds is queued now."""
        return self.queue.wait_for(lambda item: item is not None and wanted(item.request), 0)

    def wait_for(self, wanted: Callable[[GenerationRequest], bool], timeout: float) -> bool:
        """Whether a request for which ``wanted`` holds is queued (or the loop is asked to close),
        waiting up to ``timeout`` for one; nothing is taken."""
        return self.queue.wait_for(lambda item: item is None or wanted(item.request), timeout)

    def caps(self, held: Counter[str]) -> dict[str, int]:
        """Row limits for every active share: ``held`` rows (running, parked, prefilling) plus its
        queued requests; a tenant seen lately without work counts as a light tenant. Background
        work gets what interactive work has not needed lately."""
        now = time.monotonic()
        demand = Counter(held)
        demand.update(self.queue.waiting())
        background = demand.pop(BACKGROUND, 0)
        for tenant, rows in demand.items():
            if rows > 0:
                self._seen[tenant] = now
        for tenant, seen in list(self._seen.items()):
            if now - seen > self.recent_s:
                del self._seen[tenant]
            elif demand[tenant] <= 0:
                demand[tenant] = 1
        caps = row_caps(dict(demand), self.max_rows, self.light_rows)
        if background > 0:
            wanted = sum(min(rows, self.max_rows) for rows in demand.values() if rows > 0)
            caps[BACKGROUND] = max(0, self.max_rows - self.max_rows // 4 - self._interactive_peak(now, wanted))
        return caps

    def _interactive_peak(self, now: float, wanted: int) -> int:
        """The most rows interactive work wanted over the last ``recent_s`` (``wanted`` now): the
        moment between a client's answer and its next request leaves its row free, not spare."""
        peaks = self._interactive_peaks
        while peaks and peaks[-1][1] <= wanted:
            peaks.pop()
        peaks.append((now, wanted))
        while now - peaks[0][0] > self.recent_s:
            peaks.popleft()
        return peaks[0][1]

    def admit(
        self,
        *,
        block: bool,
        held: Counter[str],
        reserved: list[int],
        fits: Callable[[list[int]], bool],
        size: Callable[[Pending], int] = lambda pending: pending.reserve,
    ) -> list[Pending]:
        """Requests to start now. ``block`` (the runner is idle): wait up to ``IDLE_EXIT_S`` for one,
        then ``batch_wait`` from its arrival for company; otherwise take only what is already
        waiting. ``held`` counts each tenant's rows and ``reserved`` lists what every held row
        takes of the cache (``size`` of each of a newcomer's rows); both are updated with what is
        admitted."""
        caps = self.caps(held)
        full = {t for t, rows in held.items() if rows >= caps.get(t, self.max_rows)}
        taken: list[Pending] = []
        deadline = time.monotonic()
        while len(reserved) < self.max_rows:
            try:
                if block and not taken:
                    item = self.queue.get(timeout=IDLE_EXIT_S, skip=full)
                    deadline = time.monotonic() + self.batch_wait_s  # company is waited for from its arrival
                elif block:
                    item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()), skip=full)
                else:
                    item = self.queue.get_nowait(skip=full)
            except Empty:
                break
            if item is None:
                self.closing = True
                break
            if self._take_abort(item.request.request_id):
                item.end(abort_delta)
                continue
            tenant, n = item.share, item.rows
            wanted = reserved + [size(item)] * n
            if reserved and (len(wanted) > self.max_rows or not fits(wanted)):
                self.queue.put_back(tenant, item)  # waits for rows to finish
                break
            if held[tenant] and held[tenant] + n > caps.get(tenant, self.max_rows):
                self.queue.put_back(tenant, item)  # its tenant has its share; others may still come in
                full.add(tenant)
                continue
            taken.append(item)
            held[tenant] += n
            reserved[:] = wanted
        return taken

    def shares(
        self, running: Sequence[str], parked: Sequence[str], caps: dict[str, int]
    ) -> tuple[list[int], list[int]]:
        """Which running rows to park (the latest admitted over their tenant's cap) and which parked
        rows to resume (the earliest that fit again); rows given by their tenants, in batch order."""
        counts = Counter(running)
        park: list[int] = []
        for i in reversed(range(len(running))):
            if counts[running[i]] > caps.get(running[i], self.max_rows):
                counts[running[i]] -= 1
                park.append(i)
        park.sort()
        resume: list[int] = []
        for i, tenant in enumerate(parked):
            if counts[tenant] < caps.get(tenant, self.max_rows) and sum(counts.values()) < self.max_rows:
                counts[tenant] += 1
                resume.append(i)
        self.parks += len(park)
        return park, resume

    def drain(self) -> list[Pending]:
        """Everything still queued (at close), leaving the queue empty."""
        return [item for item in self.queue.drain() if item is not None]
