"""Parking on the torch backend: rows over their tenant's share keep their states, undecoded.

Admission alone cannot protect a light tenant: a flood admitted while it was idle keeps its rows
in the batch, and every row slows every step. So rows beyond a tenant's cap (the scheduler
decides which: ``Scheduler.shares``) are *parked*: their key/value states are split off into a
batch of their own that is not decoded, and merged back, in order, as soon as the caps allow.
"""

from __future__ import annotations

from typing import Any

from llmos.engine.scheduler import Row, Scheduler
from llmos.engine.torch_backend.batch_state import BatchState


class TenantShare:
    def __init__(self, scheduler: Scheduler, config: Any) -> None:
        self.scheduler = scheduler
        self.config = config
        self.parked: BatchState[Row] | None = None

    @property
    def parks(self) -> int:
        """Rows ever parked."""
        return self.scheduler.parks

    def rebalance(self, state: BatchState[Row] | None, caps: dict[str, int]) -> BatchState[Row] | None:
        """Park and resume rows as the scheduler decides for ``caps``; returns the batch to decode."""
        running = [r.share for r in state.rows] if state else []
        parked = [r.share for r in self.parked.rows] if self.parked else []
        park, resume = self.scheduler.shares(running, parked, caps)
        back = self.parked.split_off(resume, self.config) if self.parked is not None and resume else None
        if self.parked is not None and not self.parked.rows:
            self.parked = None
        if state is not None and park:
            self._park(state.split_off(park, self.config))
            if not state.rows:
                state = None
        if back is not None:
            if state is None:
                state = back
            else:
                state.merge(back)
        return state

    def _park(self, rows: BatchState[Row]) -> None:
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
