"""What the engine does when a chat model's engine loop dies.

Every generation in flight is tracked with the runner serving it and the sink its deltas go
to. When a loop dies (``GenerationRunner.on_crash``, called on the dying thread), each of its
requests ends at once with an error saying so, the runner is dropped from residency, and a
fresh one is loaded in the background; until it is, the model counts as restarting (/ready
answers 503) and requests for it get 503 with Retry-After.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from llmos.engine import threads
from llmos.engine.protocol import FinishReason, GenerationDelta
from llmos.engine.runner import GenerationRunner
from llmos.errors import ServiceUnavailableError
from llmos.kernel import ModelResidency

log = logging.getLogger(__name__)
Sink = Callable[[GenerationDelta], None]
RestartHook = Callable[[str, str, bool], None]


class CrashWatch:
    def __init__(self, residency: ModelResidency[Any], on_restart: RestartHook | None = None) -> None:
        """``on_restart(model, reason, restarted)`` is told each time a crashed engine loop has been
        restarted, or the restart failed (the platform writes it to the audit log)."""
        self.residency = residency
        self.on_restart = on_restart
        self.restarts = 0
        self.restarting: set[str] = set()
        """Residency keys of the models being restarted."""
        self._lock = threading.Lock()
        self._inflight: dict[str, tuple[GenerationRunner, Sink, int]] = {}

    def watch(self, key: str, runner: GenerationRunner) -> None:
        """Watch a freshly loaded runner, resident under ``key``."""
        runner.on_crash = lambda exc: self._on_crash(key, runner, exc)

    @contextmanager
    def tracking(self, request_id: str, runner: GenerationRunner, sink: Sink, n: int, model: str) -> Iterator[None]:
        """Track a generation for as long as the block runs; 503 if its runner has crashed already."""
        with self._lock:  # a loop that dies after this fails the request (see _on_crash)
            if runner.crashed is not None:
                raise ServiceUnavailableError(
                    f"the engine for {model} crashed and is restarting; retry shortly", retry_after=1.0
                )
            self._inflight[request_id] = (runner, sink, n)
        try:
            yield
        finally:
            with self._lock:
                self._inflight.pop(request_id, None)

    def runner_of(self, request_id: str) -> GenerationRunner | None:
        entry = self._inflight.get(request_id)
        return entry[0] if entry else None

    def _on_crash(self, key: str, runner: GenerationRunner, exc: BaseException) -> None:
        """On the dying engine thread: fail every request it had, forget the runner, load anew."""
        reason = f"{type(exc).__name__}: {exc}"
        with self._lock:
            victims = [(sink, n) for r, sink, n in self._inflight.values() if r is runner]
            self.residency.discard(key, runner)
            self.restarting.add(key)
        log.error("engine loop of %s crashed (%s); failing %d request(s)", runner.name, reason, len(victims))
        message = f"the engine crashed while serving this request ({reason}); it is being restarted, retry shortly"
        for sink, n in victims:
            for index in range(n):
                sink(GenerationDelta(index=index, text="", finish_reason=FinishReason.ERROR, error=message))
        threading.Thread(target=self._restart, args=(key, runner.name, reason), name="engine-restart").start()

    def _restart(self, key: str, name: str, reason: str) -> None:
        threads.enter_helper_thread()
        restarted = False
        try:
            self.residency.acquire(key)
            self.residency.release(key)
            restarted = True
            log.warning("engine for %s restarted after a crash (%s)", name, reason)
        except Exception:  # the next request loads it again and reports why
            log.exception("restarting the engine for %s failed", name)
        finally:
            with self._lock:
                self.restarting.discard(key)
                self.restarts += restarted
        if self.on_restart is not None:
            self.on_restart(name, reason, restarted)
