"""The engine thread of one chat model, whatever backend computes it.

``GenerationRunner`` owns what every backend shares: the thread's life (started by the first
request, ended after ``IDLE_EXIT_S`` with nothing to do, stopped for good by ``close``; a loop
that dies is reported through ``on_crash``), the scheduler (admission, aborts, tenant shares),
the loop itself and the counters. A backend subclasses it and supplies its reservation and fit
check, how an admitted request starts, one ``_execute`` (prefill chunk and decode step), how
rows are parked, and what it frees when it stops.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from llmos.engine import heap
from llmos.engine.admission import cache_exceeded
from llmos.engine.choices import abort_delta, error_delta
from llmos.engine.config import EngineConfig
from llmos.engine.protocol import GenerationRequest
from llmos.engine.scheduler import Pending, Row, Scheduler, Sink
from llmos.monitoring import metrics

log = logging.getLogger(__name__)


class GenerationRunner(ABC):
    cache_setting = "kv_cache_mb"
    """The setting that sizes this backend's key/value cache (named in refusals)."""

    def __init__(self, name: str, config: EngineConfig, max_rows: int) -> None:
        self.name = name
        self.config = config
        self.max_batch_size = max_rows
        self.scheduler = Scheduler(max_rows, config.batch_wait_s, config.tenant_rows_when_shared)
        self.tokens_generated = 0  # every token computed, including for requests later aborted
        self.prefills = 0
        self.prefill_tokens = 0  # prompt tokens computed (those reused from a cached prefix are not)
        self.peak_rows = 0  # the most rows ever decoded in one step
        # What the loop holds now, as of its latest iteration (read by other threads for metrics).
        self.requests_running = 0
        self.reserved_tokens = 0
        self.batch_size = 0  # rows the latest decode step advanced
        self._queue_time = metrics.REQUEST_QUEUE_TIME.labels(metrics.MODEL_NAMES(name)) if config.metrics else None
        self.crashed: BaseException | None = None
        """Why the engine thread died, if it did; its requests are then failed by whoever watches it."""
        self.on_crash: Callable[[BaseException], None] | None = None
        self.threads_started = 0
        self._working = False
        self._thread_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- what a backend supplies -----------------------------------------------------------
    @abstractmethod
    def _reservation(self, request: GenerationRequest, virtual: Any) -> int:
        """Cache tokens one choice of ``request`` may grow to."""

    @abstractmethod
    def _fits(self, reserved: list[int]) -> bool:
        """Whether rows with these reservations fit the backend's cache together."""

    @property
    @abstractmethod
    def budget_tokens(self) -> int:
        """The cache's size in tokens (named in refusals)."""

    @abstractmethod
    def _rows(self) -> Iterable[Row]:
        """Every row held: running and parked."""

    @abstractmethod
    def _prefilling(self) -> Iterable[Pending]:
        """Requests admitted whose prompts are not yet prefilled."""

    @abstractmethod
    def _start(self, pending: Pending) -> None:
        """Begin an admitted request (its prefill)."""

    @abstractmethod
    def _cancel_prefill(self, pending: Pending) -> None:
        """Forget a request being prefilled (aborted); the runner ends it."""

    @abstractmethod
    def _rebalance(self, caps: dict[str, int]) -> None:
        """Park and resume rows as ``self.scheduler.shares`` decides for ``caps``."""

    @abstractmethod
    def _execute(self) -> None:
        """One iteration: a prefill chunk and a decode step; stream what they yield, retire
        finished rows. A failure of the step fails its rows and returns."""

    @abstractmethod
    def _enter_thread(self) -> None:
        """Set up the engine thread (how many cores its torch operators use)."""

    @abstractmethod
    def _release(self) -> None:
        """Free what only the engine thread used, once it has stopped."""

    # -- called from other threads ---------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink, adapter: str | None = None, virtual: Any = None) -> None:
        """Queue a request (after ``check_fits``); ``adapter`` and ``virtual`` adapt its rows."""
        pending = Pending(request, sink, self._reservation(request, virtual), adapter, virtual)
        with self._thread_lock:
            closed = self.scheduler.closing
            if not closed:
                self.scheduler.put(pending)
                if self._thread is None:  # none yet, or it ended idle: this request starts one
                    self._start_thread()
        if closed:
            pending.end(abort_delta)

    def check_fits(self, request: GenerationRequest, virtual: Any = None) -> None:
        """Refuse (400) a request that could not fit the key/value cache even alone."""
        reserve = self._reservation(request, virtual)
        if not self._fits([reserve] * request.params.n):
            raise cache_exceeded(request.params.n, reserve, self.budget_tokens, self.name, self.cache_setting)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    @property
    def busy(self) -> bool:
        return self._working or not self.scheduler.queue.empty()

    @property
    def rows_parked(self) -> int:
        return self.scheduler.parks

    def stats(self) -> dict[str, Any]:
        """Counters for operators and tests (a backend adds its own)."""
        return {
            "busy": self.busy,
            "tokens_generated": self.tokens_generated,
            "prefills": self.prefills,
            "peak_rows": self.peak_rows,
            "prefill_tokens": self.prefill_tokens,
            "rows_parked": self.rows_parked,
            "requests_running": self.requests_running,
            "requests_waiting": len(self.scheduler.queue),
            "batch_size": self.batch_size,
            "kv_cache_usage": min(1.0, self.reserved_tokens / max(1, self.budget_tokens)),
        }

    def close(self) -> None:
        """Stop the thread for good: what runs or waits ends with its abort, later requests too."""
        with self._thread_lock:  # no request starts a thread from now on
            self.scheduler.closing = True
            thread = self._thread
        self.scheduler.wake()
        if thread is not None:
            thread.join(timeout=30)
        if thread is None or not thread.is_alive():
            for pending in self.scheduler.drain():
                pending.end(abort_delta)
            self._release()

    # -- the engine thread -----------------------------------------------------------------
    def _start_thread(self) -> None:
        """Start the engine thread (``_thread_lock`` held). If it cannot start, the error reaches
        the caller and the next ``submit`` tries again."""
        thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        thread.start()
        self._thread = thread
        self.threads_started += 1

    def _run(self) -> None:
        """A failed step fails its rows and the loop goes on; anything that escapes the loop kills
        the thread, and ``on_crash`` is told so it can fail what was in flight and start afresh."""
        try:
            self._enter_thread()
            self._loop()
        except BaseException as exc:
            log.critical("the engine loop of %s crashed", self.name, exc_info=exc)
            self.crashed = exc
            self._release()
            if self.on_crash is not None:
                self.on_crash(exc)

    def _loop(self) -> None:
        """Schedule (admit, abort, share), execute, until closed or idle for ``IDLE_EXIT_S``."""
        scheduler = self.scheduler
        while not scheduler.closing:
            idle = not self._has_work()
            reserved = self._reserved()
            if idle:  # what it held has finished: say so before waiting for more
                self.requests_running = self.reserved_tokens = self.batch_size = 0
            admitted = scheduler.admit(
                block=idle, held=self._held(), reserved=reserved, fits=self._fits, size=self._admission_size
            )
            if idle and not admitted and not scheduler.closing and self._end_if_idle():
                return
            self._working = True
            self._note_admitted(admitted, reserved)
            for pending in admitted:
                self._start(pending)
            gone = scheduler.take_aborted(self._request_ids)
            if gone:
                self._drop(gone)
            self._rebalance(scheduler.caps(self._held()))
            self._execute()
            if self.config.heap_slack_bytes:
                # What the step's batches freed stays in glibc's heaps: given back once it passes the slack.
                heap.release_beyond(self.config.heap_slack_bytes)
            self._working = self._has_work()
        self._end_everything(abort_delta)

    def _end_if_idle(self) -> bool:
        """Whether this thread ends now: nothing is queued (a request queued after this check
        starts a new thread, see ``submit``)."""
        with self._thread_lock:
            if not self.scheduler.queue.empty():
                return False
            self._thread = None
            self._working = False
        # What a burst's batches freed stays in glibc's heaps, resident, until given back.
        heap.trim()
        return True

    def _has_work(self) -> bool:
        return any(True for _ in self._rows()) or any(True for _ in self._prefilling())

    def _held(self) -> Counter[str]:
        held = Counter(row.share for row in self._rows())
        for pending in self._prefilling():
            held[pending.share] += pending.rows
        return held

    def _admission_size(self, pending: Pending) -> int:
        """Cache tokens each row of ``pending`` is admitted for: by default its reservation."""
        return pending.reserve

    def _reserved(self) -> list[int]:
        """Cache tokens every held row is counted for at admission: by default its reservation."""
        reserved = [row.pending.reserve for row in self._rows()]
        for pending in self._prefilling():
            reserved += [pending.reserve] * pending.rows
        return reserved

    def _request_ids(self) -> Iterable[str]:
        yield from (row.pending.request.request_id for row in self._rows())
        yield from (pending.request.request_id for pending in self._prefilling())

    def _drop(self, gone: set[str]) -> None:
        """End aborted rows and prompts; their rows leave the batch in the next step."""
        for row in self._rows():
            if row.pending.request.request_id in gone:
                row.end(abort_delta(row.index))
        for pending in [p for p in self._prefilling() if p.request.request_id in gone]:
            self._cancel_prefill(pending)
            pending.end(abort_delta)

    def _end_everything(self, delta: Callable[[int], Any]) -> None:
        """At close: every row, prompt and queued request ends with ``delta``."""
        for row in self._rows():
            row.end(delta(row.index))
        for pending in list(self._prefilling()):
            self._cancel_prefill(pending)
            pending.end(delta)
        for pending in self.scheduler.drain():
            pending.end(delta)

    def _fail_rows(self, rows: Iterable[Row], exc: Exception) -> None:
        for row in rows:
            row.end(error_delta(row.index, exc))

    def _note_step(self, rows: int, fresh: int) -> None:
        """Count a step that chose ``fresh`` new tokens over ``rows`` rows."""
        self.tokens_generated += fresh
        self.peak_rows = max(self.peak_rows, rows)
        self.batch_size = rows

    def _note_admitted(self, admitted: list[Pending], reserved: list[int]) -> None:
        """What this iteration holds (``reserved`` includes the ``admitted``), and how long the
        admitted requests waited in the queue."""
        self.reserved_tokens = sum(reserved)
        self.requests_running = len(set(self._request_ids())) + len(admitted)
        if self._queue_time is not None:
            now = time.monotonic()
            for pending in admitted:
                if pending.resume is None:  # a preempted row was observed when its request came in
                    self._queue_time.observe(now - pending.queued_at)
