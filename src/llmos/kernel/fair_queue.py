"""A blocking queue that serves tenants in turn, so one tenant's flood cannot starve another.

Items of one tenant keep their order; across tenants, ``get`` takes one item from each tenant
with work in round-robin order, passing over tenants the caller says are at their share.
Thread-safe; used between the API threads and an engine thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from typing import Generic, TypeVar

T = TypeVar("T")


class Empty(Exception):
    """Raised by ``get`` when nothing arrived before the timeout."""


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[T]] = OrderedDict()
        self._cond = threading.Condition()
        self._size = 0

    def put(self, tenant: str, item: T) -> None:
        with self._cond:
            self._queues.setdefault(tenant, deque()).append(item)
            self._size += 1
            self._cond.notify()

    def get(self, timeout: float | None = None, *, skip: Collection[str] = ()) -> T:
        """The next item in tenant round-robin order, from a tenant not in ``skip``; blocks up to
        ``timeout`` (None: forever) for one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                tenant = next((t for t in self._queues if t not in skip), None)
                if tenant is not None:
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Empty
                self._cond.wait(remaining)
            items = self._queues.pop(tenant)
            item = items.popleft()
            self._size -= 1
            if items:
                self._queues[tenant] = items  # back of the line: the others go first
            return item

    def wait_for(self, matches: Callable[[T], bool], timeout: float) -> bool:
        """Whether an item for which ``matches`` holds is queued, waiting up to ``timeout`` for one
        (each ``put`` wakes the wait to look); nothing is taken."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not any(matches(item) for items in self._queues.values() for item in items):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def put_back(self, tenant: str, item: T) -> None:
        """Return an item just taken: first in its tenant's line, and the tenant's turn restored."""
        with self._cond:
            self._queues.setdefault(tenant, deque()).appendleft(item)
            self._queues.move_to_end(tenant, last=False)
            self._size += 1
            self._cond.notify()

    def remove(self, unwanted: Callable[[T], bool]) -> list[T]:
        """Take out every queued item for which ``unwanted`` is true (in tenant order)."""
        removed: list[T] = []
        with self._cond:
            for tenant in list(self._queues):
                items = self._queues[tenant]
                kept = deque(item for item in items if not unwanted(item))
                removed += [item for item in items if unwanted(item)]
                if kept:
                    self._queues[tenant] = kept
                else:
                    del self._queues[tenant]
            self._size -= len(removed)
        return removed

    def waiting(self) -> dict[str, int]:
        """How many items each tenant has queued."""
        with self._cond:
            return {tenant: len(items) for tenant, items in self._queues.items()}

    def get_nowait(self, *, skip: Collection[str] = ()) -> T:
        return self.get(timeout=0, skip=skip)

    def drain(self) -> list[T]:
        """Everything queued, in tenant round-robin order, leaving the queue empty."""
        drained = []
        while True:
            try:
                drained.append(self.get_nowait())
            except Empty:
                return drained

    def empty(self) -> bool:
        with self._cond:
            return self._size == 0

    def __len__(self) -> int:
        with self._cond:
            return self._size
