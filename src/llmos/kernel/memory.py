"""Model residency: load on first use, evict the least recently used idle model over budget.

Pure bookkeeping over injected ``load``/``unload`` functions, so it is tested without models.
Loading one model never blocks requests to a model that is already resident: the global
lock guards only the bookkeeping, each key has its own load lock.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from llmos.errors import ServiceUnavailableError

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class _Slot(Generic[T]):
    value: T
    size: int
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ModelResidency(Generic[T]):
    def __init__(
        self, budget_bytes: int, load: Callable[[str], T], unload: Callable[[T], None], size_of: Callable[[str], int]
    ) -> None:
        self.budget = budget_bytes
        self._load = load
        self._unload = unload
        self._size_of = size_of
        self._slots: dict[str, _Slot[T]] = {}
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(s.size for s in self._slots.values())

    def peek(self, key: str) -> T | None:
        """The resident value for ``key`` without pinning or loading it."""
        with self._lock:
            slot = self._slots.get(key)
            return slot.value if slot else None

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._slots)

    def resident_bytes(self) -> dict[str, int]:
        """Each resident key's size as counted against the budget."""
        with self._lock:
            return {key: slot.size for key, slot in self._slots.items()}

    @contextmanager
    def use(self, key: str) -> Iterator[T]:
        """Hold ``key`` resident (loading it if needed) for the duration of the block."""
        value = self.acquire(key)
        try:
            yield value
        finally:
            self.release(key)

    def acquire(self, key: str) -> T:
        with self._lock:
            slot = self._pin(key)
            if slot is not None:
                return slot.value
            load_lock = self._load_locks.setdefault(key, threading.Lock())
        with load_lock:
            with self._lock:  # another thread may have loaded it while we waited
                slot = self._pin(key)
                if slot is not None:
                    return slot.value
                size = self._size_of(key)
                if size > self.budget:
                    raise ServiceUnavailableError(
                        f"model {key} needs {size >> 20} MiB, more than the whole memory budget "
                        f"({self.budget >> 20} MiB)",
                        code="insufficient_memory",
                    )
                self._make_room(size)
            log.info("loading model %s (%d MiB)", key, size >> 20)
            value = self._load(key)
            with self._lock:
                self._slots[key] = _Slot(value=value, size=size, users=1)
            return value

    def release(self, key: str, value: T | None = None) -> None:
        """Unpin ``key``. Given the ``value`` that was acquired, a release that comes after that value
        was discarded (and perhaps replaced by a fresh load) leaves the new one alone."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None and (value is None or slot.value is value):
                slot.users = max(0, slot.users - 1)
                slot.last_used = time.monotonic()

    def discard(self, key: str, value: T) -> bool:
        """Forget ``key`` now, even while in use, if it still holds ``value`` (a runner that crashed):
        the next ``acquire`` loads a fresh one. The old value is not unloaded here; it goes when its
        last user lets go of it."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.value is not value:
                return False
            del self._slots[key]
            return True

    def evict(self, key: str) -> bool:
        """Unload ``key`` now if nobody uses it (e.g. the model was deleted)."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None or slot.users:
                return False
            del self._slots[key]
        self._unload(slot.value)
        return True

    def close(self) -> None:
        with self._lock:
            slots, self._slots = list(self._slots.values()), {}
        for slot in slots:
            self._unload(slot.value)

    def _pin(self, key: str) -> _Slot[T] | None:
        slot = self._slots.get(key)
        if slot is not None:
            slot.users += 1
            slot.last_used = time.monotonic()
        return slot

    def _make_room(self, size: int) -> None:
        """Evict idle models, least recently used first, until ``size`` fits (caller holds the lock).

        Models in use are never evicted; if they alone exceed the budget we load anyway and log it,
        since refusing would fail requests that the machine can in fact serve.
        """
        used = sum(s.size for s in self._slots.values())
        for key, slot in sorted(self._slots.items(), key=lambda kv: kv[1].last_used):
            if used + size <= self.budget:
                break
            if slot.users:
                continue
            log.info("evicting model %s (least recently used) to free %d MiB", key, slot.size >> 20)
            del self._slots[key]
            used -= slot.size
            self._unload(slot.value)
        if used + size > self.budget:
            log.warning("memory budget exceeded: %d MiB in use by busy models", (used + size) >> 20)
