"""Which threads run torch on several cores, and why only a few may.

torch's CPU operators are parallelised with OpenMP (libgomp). Every thread that runs a
multi-threaded operator gets its own team of worker threads, kept alive as long as that thread.
Once a process holds more such workers than it has cores, libgomp stops letting idle workers
spin before they sleep, so every operator of a decode step then waits for sleeping workers to
wake: on the 2-core reference machine one SmolLM2 decode step took 17.6 ms on an engine thread
alone and 31.9 ms once any other long-lived thread had run a single 2-thread matrix product
(an asyncio helper thread that loaded a model, say).

So the engine keeps multi-threaded torch to its compute threads: each chat model's engine
loop, and one shared thread for the encoder models' forward passes. Every other thread the
engine uses (loading models and adapters, tokenising, registry lookups) runs torch on one core.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

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


def helper_pool(workers: int = 8) -> ThreadPoolExecutor:
    """Threads for the engine's blocking work off the event loop, each running torch on one core."""
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine-helper", initializer=enter_helper_thread)


class _ComputeThread:
    """One long-lived thread on which encoder models run their forward passes, in submission order."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def run(self, work: Callable[[], T]) -> T:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="engine-compute", initializer=enter_compute_thread
                )
            pool = self._pool
        return pool.submit(work).result()


encoder_compute = _ComputeThread()
"""The process's one compute thread for encoders (a second one would mean a second OpenMP team)."""
