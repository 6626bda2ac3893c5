"""Denied requests (no key, a wrong, revoked or expired one, a missing scope) cost nothing lasting:
they are counted in memory per client address, refused with 429 beyond an allowance a minute, and
reach the audit log as one row per address, route and key for each flush (with their count),
never as one row each.

The clock is injected so windows are tested without sleeping. Memory stays bounded whatever the
number of addresses: beyond ``max_addresses`` live addresses, new ones share one allowance, and
beyond ``max_groups`` tallies, new ones are counted under the address ``*``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from llmos.errors import RateLimitError

WINDOW_S = 60.0
OVERFLOW = "*"
"""The address of requests counted together once too many distinct ones are tracked."""


@dataclass
class DeniedTally:
    """Denied requests of one address on one route (and key, when one was shown) since the last flush."""

    client: str | None
    route: str
    tenant: str | None
    key_id: str | None
    first_at: datetime
    last_at: datetime
    count: int = 0
    throttled: int = 0
    codes: Counter[str] = field(default_factory=Counter)


_GroupKey = tuple[str | None, str, str | None, str | None]


class DeniedRequests:
    def __init__(
        self,
        per_minute: int = 30,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_addresses: int = 100_000,
        max_groups: int = 10_000,
    ) -> None:
        self.per_minute = per_minute
        self._clock = clock
        self._wall = wall
        self._max_addresses = max_addresses
        self._max_groups = max_groups
        self._recent: dict[str, deque[float]] = {}
        self._tallies: dict[_GroupKey, DeniedTally] = {}
        self._lock = threading.Lock()

    def note(
        self, *, client: str | None, route: str, code: str | None, tenant: str | None = None, key_id: str | None = None
    ) -> None:
        """Count one denied request. Raises 429 (``Retry-After`` set) when its address was already
        denied ``per_minute`` times in the last minute; the caller answers with its own error otherwise."""
        now = self._clock()
        with self._lock:
            recent = self._window_of(client or "", now)
            throttled = len(recent) >= self.per_minute
            self._tally(client, route, tenant, key_id, code or "denied", throttled)
            if throttled:
                raise RateLimitError(
                    f"Too many denied requests from this address: at most {self.per_minute} a minute.",
                    retry_after=max(1.0, recent[0] + WINDOW_S - now),
                    code="too_many_denied_requests",
                )
            recent.append(now)

    def _window_of(self, address: str, now: float) -> deque[float]:
        recent = self._recent.get(address)
        if recent is None:
            if len(self._recent) >= self._max_addresses:
                self._forget_idle(now)
            if len(self._recent) >= self._max_addresses:
                address = OVERFLOW
            recent = self._recent.setdefault(address, deque())
        while recent and recent[0] <= now - WINDOW_S:
            recent.popleft()
        return recent

    def _forget_idle(self, now: float) -> None:
        idle = [a for a, times in self._recent.items() if not times or times[-1] <= now - WINDOW_S]
        for address in idle:
            del self._recent[address]

    def _tally(
        self, client: str | None, route: str, tenant: str | None, key_id: str | None, code: str, throttled: bool
    ) -> None:
        group = (client, route, tenant, key_id)
        tally = self._tallies.get(group)
        if tally is None and len(self._tallies) >= self._max_groups:
            group = (OVERFLOW, route, None, None)
            tally = self._tallies.get(group)
        at = self._wall()
        if tally is None:
            tally = self._tallies[group] = DeniedTally(
                client=group[0], route=route, tenant=group[2], key_id=group[3], first_at=at, last_at=at
            )
        tally.last_at = at
        tally.count += 1
        tally.throttled += throttled
        tally.codes[code] += 1

    def drain(self) -> list[DeniedTally]:
        """The tallies since the last drain, which start afresh."""
        with self._lock:
            tallies, self._tallies = list(self._tallies.values()), {}
        return tallies

    def pending(self) -> int:
        with self._lock:
            return len(self._tallies)
