"""Which threads run torch on several cores, and why only a few may.

torch's CPU operators are parallelised with OpenMP (libgomp). Every thread that runs a
multi-threaded operator gets its own team of worker threads, kept alive as long as that thread.
Once a process holds more such workers than it has cores, libgomp stops letting idle workers
spin before they sleep, so every operator of a decode step then waits for sleeping workers to
wake, nearly doubling the step's time, once any other long-lived thread has run a single
2-thread matrix product (an asyncio helper thread that loaded a model, say; docs/performance.md,
design measurements).

So the engine keeps multi-threaded torch to its compute threads: each chat model's engine
loop, and one shared thread for the encoder models' forward passes. Every other thread the
engine uses (loading models and adapters, tokenising, registry lookups) runs torch on one core.
And compute threads end when idle for ``IDLE_EXIT_S`` (a team lives as long as its thread): a
chat model's engine loop, or the encoders' thread, that kept its team after its last request
would keep every other compute thread's steps slow.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar, cast

import torch

T = TypeVar("T")
_DEFAULT = torch.get_num_threads()  # torch's own default (the cores it may use), before anyone changes it
_threads = _DEFAULT


def configure(threads: int) -> None:
    """How many cores compute threads use (0: torch's default)."""
    global _threads
    _threads = threads or _DEFAULT


def compute_threads() -> int:
    return _threads


def _pin(count: int) -> None:
    """Fix this thread's torch thread count for good. ``set_num_threads`` sets this thread's
    count and a process-wide one; a thread's first parallel operator (or ``get_num_threads``)
    copies the process-wide one into the thread, which may by then be another thread's. Setting,
    reading and setting again leaves this thread initialised with its own count."""
    torch.set_num_threads(count)
    torch.get_num_threads()
    torch.set_num_threads(count)


def enter_compute_thread() -> None:
    """Call at the start of a thread that runs models: it parallelises over ``compute_threads()``."""
    _pin(_threads)


def enter_helper_thread() -> None:
    """Call at the start of any other thread that may touch torch: it never starts an OpenMP team."""
    _pin(1)


def on_compute_thread(work: Callable[[], T]) -> T:
    """``work()`` on a short-lived thread that parallelises as compute threads do: for checks at
    load that must run the kernels the engine's steps will (oneDNN may choose them by the thread
    count). Its result, or its exception, comes back here."""
    with ThreadPoolExecutor(max_workers=1, initializer=enter_compute_thread) as pool:
        return pool.submit(work).result()


def helper_pool(workers: int = 8) -> ThreadPoolExecutor:
    """Threads for the engine's blocking work off the event loop, each running torch on one core."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine-helper", initializer=enter_helper_thread)


IDLE_EXIT_S = 1.0
"""How long a compute thread (an engine loop, the encoders' thread) outlives its last work."""


class _ComputeThread:
    """The thread on which encoder models run their forward passes, in submission order.

    It ends after ``IDLE_EXIT_S`` without work, and its OpenMP team with it: libgomp counts
    every team's threads, and while a process holds more than it has cores it stops letting idle
    workers spin (above): one embeddings call left the chat model's throughput markedly lower, its
    cores partly idle, for as long as this thread lived (docs/performance.md, design
    measurements). A new thread (and team) starts with the next piece of work."""

    def __init__(self, idle_exit_s: float = IDLE_EXIT_S) -> None:
        self.idle_exit_s = idle_exit_s
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._work: deque[tuple[Callable[[], object], Future[object]]] = deque()
        self._serving = False
        self.threads_started = 0

    def run(self, work: Callable[[], T]) -> T:
        future: Future[object] = Future()
        with self._lock:
            self._work.append((work, future))
            if self._serving:
                self._more.notify()
            else:
                try:
                    threading.Thread(target=self._serve, name="engine-compute", daemon=True).start()
                except BaseException:
                    self._work.pop()  # not queued after all: the next call tries to start one again
                    raise
                self._serving = True
                self.threads_started += 1
        return cast(T, future.result())

    def _serve(self) -> None:
        enter_compute_thread()
        while True:
            with self._lock:
                if not self._work:
                    self._more.wait(timeout=self.idle_exit_s)
                if not self._work:
                    self._serving = False  # under the lock: a later ``run`` starts a new thread
                    return
                work, future = self._work.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except BaseException as exc:  # the caller re-raises it
                    future.set_exception(exc)


encoder_compute = _ComputeThread()
"""The process's one compute thread for encoders (a second one would mean a second OpenMP team)."""
