"""One runner's batch shared between tenants (the policy is ``kernel.fair_share.row_caps``).

Admission alone cannot protect a light tenant: a flood admitted while it was idle keeps its rows
in the batch, and every row slows every step. So rows beyond a tenant's cap are *parked*: their
key/value states are kept, they are not decoded, and they resume, in order, as soon as the caps
allow. A tenant seen in the last ``recent_s`` seconds still counts as active, so the gap between
one client's sequential requests does not let a flood back in.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from llmos.engine.torch_backend.batch_state import BatchState
from llmos.kernel.fair_share import row_caps

RECENT_S = 2.0


def _tenant(row: Any) -> str:
    return str(row.pending.request.tenant)


class TenantShare:
    def __init__(self, max_rows: int, light_rows: int, config: Any, recent_s: float = RECENT_S) -> None:
        self.max_rows = max_rows
        self.light_rows = light_rows
        self.config = config
        self.recent_s = recent_s
        self.parked: BatchState[Any] | None = None
        self.parks = 0  # rows ever parked
        self._seen: dict[str, float] = {}

    def caps(self, held: Counter[str], waiting: dict[str, int]) -> dict[str, int]:
        """Row limits for every active tenant: ``held`` rows (running, parked, prefilling) plus
        ``waiting`` requests; one seen lately without work counts as a light tenant."""
        now = time.monotonic()
        demand = Counter(held)
        demand.update(waiting)
        for tenant, rows in demand.items():
            if rows > 0:
                self._seen[tenant] = now
        for tenant, seen in list(self._seen.items()):
            if now - seen > self.recent_s:
                del self._seen[tenant]
            elif demand[tenant] <= 0:
                demand[tenant] = 1
        return row_caps(dict(demand), self.max_rows, self.light_rows)

    def held(self, state: BatchState[Any] | None) -> Counter[str]:
        rows = (state.rows if state else []) + (self.parked.rows if self.parked else [])
        return Counter(_tenant(r) for r in rows)

    def rebalance(self, state: BatchState[Any] | None, caps: dict[str, int]) -> BatchState[Any] | None:
        """Park running rows beyond their tenant's cap (the latest admitted first), resume parked
        rows that fit again (the earliest first); returns the batch to decode."""
        running = Counter(_tenant(r) for r in state.rows) if state else Counter()
        if state is not None:
            excess: list[int] = []
            for i in reversed(range(len(state.rows))):
                tenant = _tenant(state.rows[i])
                if running[tenant] > caps.get(tenant, self.max_rows):
                    running[tenant] -= 1
                    excess.append(i)
            if excess:
                self.parks += len(excess)
                self._park(state.split_off(sorted(excess), self.config))
                if not state.rows:
                    state = None
        if self.parked is not None:
            resume: list[int] = []
            for i, row in enumerate(self.parked.rows):
                tenant = _tenant(row)
                if running[tenant] < caps.get(tenant, self.max_rows) and sum(running.values()) < self.max_rows:
                    running[tenant] += 1
                    resume.append(i)
            if resume:
                back = self.parked.split_off(resume, self.config)
                if not self.parked.rows:
                    self.parked = None
                if state is None:
                    state = back
                else:
                    state.merge(back)
        return state

    def _park(self, rows: BatchState[Any]) -> None:
        if self.parked is None:
            self.parked = rows
        else:
            self.parked.merge(rows)

    def drop_finished(self) -> None:
        """Forget parked rows that ended while parked (their client went away)."""
        if self.parked is None:
            return
        keep = [i for i, r in enumerate(self.parked.rows) if not r.finished]
        if not keep:
            self.parked = None
        else:
            self.parked.select(keep)
