"""A blocking queue that serves tenants in turn, so one tenant's flood cannot starve another.

Items of one tenant keep their order; across tenants, ``get`` takes one item from each tenant
with work in round-robin order. Thread-safe; used between the API threads and an engine thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
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

    def get(self, timeout: float | None = None) -> T:
        """The next item in tenant round-robin order; blocks up to ``timeout`` (None: forever)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._size == 0:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Empty
                self._cond.wait(remaining)
            tenant, items = next(iter(self._queues.items()))
            item = items.popleft()
            self._size -= 1
            del self._queues[tenant]
            if items:
                self._queues[tenant] = items  # back of the line: the others go first
            return item

    def get_nowait(self) -> T:
        return self.get(timeout=0)

    def empty(self) -> bool:
        with self._cond:
            return self._size == 0

    def __len__(self) -> int:
        with self._cond:
            return self._size
