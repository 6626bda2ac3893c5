"""Work that runs inside a server (batches, hyperparameter searches, eval runs), shared by every
server on one database: a server claims an unfinished row by writing itself as its ``owner``,
renews its ``heartbeat_at`` while it runs it, and releases it when it stops. A row whose owner's
heartbeat is older than ``stale_after`` (its server died) is claimed by the next server that looks.
Every claim is a conditional update, so of two servers looking at once exactly one takes a row.

The servers' clocks are compared through the heartbeats they write: they must agree to well within
``stale_after`` (NTP does).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update

from llmos.registry.db import Database

STALE_AFTER = timedelta(seconds=30)
"""A claim whose server has not renewed it this long is taken over by the next server that looks."""


class Leases:
    """Claims on the rows of ``table``, whose columns ``id``, ``status``, ``owner`` and
    ``heartbeat_at`` say what each is, who runs it and when that server was last heard from."""

    def __init__(
        self,
        db: Database,
        table: Any,
        unfinished: Collection[str],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.db = db
        self.table = table
        self.unfinished = [str(status) for status in unfinished]
        self.clock = clock

    def claim(self, owner: str, stale_after: timedelta, *, only: str | None = None) -> list[str]:
        """The ids of unfinished rows nobody runs (new, released, or their owner's heartbeat stale),
        now ``owner``'s, oldest first (``only``: that row alone, if it is free)."""
        t = self.table
        now = self.clock()
        free = (t.status.in_(self.unfinished), or_(t.owner.is_(None), t.heartbeat_at < now - stale_after))
        with self.db.session() as s:
            q = select(t.id).where(*free)
            if only is not None:
                q = q.where(t.id == only)
            candidates = list(s.scalars(q.order_by(t.created_at, t.id)))
        claimed = []
        for row_id in candidates:
            with self.db.session() as s:  # the same condition, checked and taken in one statement
                taken = s.execute(
                    update(t)
                    .where(t.id == row_id, *free)
                    .values(owner=owner, heartbeat_at=now)
                    .execution_options(synchronize_session=False)
                )
            if getattr(taken, "rowcount", 0) == 1:  # else another server took it first
                claimed.append(row_id)
        return claimed

    def beat(self, owner: str, row_ids: Collection[str]) -> set[str]:
        """Renew ``owner``'s hold on ``row_ids``; those it still holds (the others were deleted,
        or taken over by another server after this one fell silent)."""
        if not row_ids:
            return set()
        t = self.table
        mine = (t.id.in_(list(row_ids)), t.owner == owner)
        with self.db.session() as s:
            s.execute(
                update(t).where(*mine).values(heartbeat_at=self.clock()).execution_options(synchronize_session=False)
            )
            return set(s.scalars(select(t.id).where(*mine)))

    def release(self, owner: str, row_id: str) -> None:
        """Give a row up (this server stops running it): the next server to look takes it at once."""
        t = self.table
        with self.db.session() as s:
            s.execute(
                update(t)
                .where(t.id == row_id, t.owner == owner)
                .values(owner=None)
                .execution_options(synchronize_session=False)
            )


def new_owner() -> str:
    """A name for this server's runner, unique among the servers on a database and across restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
