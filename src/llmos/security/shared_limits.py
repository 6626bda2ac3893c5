"""Rate, token and concurrency limits kept in the database, so that every API server on one
database enforces them together and they survive a restart (``limits_store = "database"``).

The same rules as the in-memory limiter (``limits.check_room``), over rows instead of deques: an
admission locks each of its subjects' rows (an UPDATE, which PostgreSQL holds per row until the
transaction ends and SQLite as its one writer lock), counts the last minute's requests and tokens
and the live leases, and records its own request and lease in the same transaction, so two
servers never both admit the last request a limit allows. A lease expires after ``LEASE_TTL_S``:
a server that dies mid-request stops holding its concurrency slots then, without any server
having to notice.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from llmos.registry.db import Database
from llmos.registry.limit_tables import RateEventRow, RateLeaseRow, RateSubjectRow
from llmos.security.limits import WINDOW_S, Lease, Limits, Room, check_room

log = logging.getLogger(__name__)

LEASE_TTL_S = 600.0
"""How long a request in flight holds a concurrency slot at most (a crashed server's slots free then)."""


class DatabaseRateLimiter:
    def __init__(self, db: Database, clock: Callable[[], float] = time.time, lease_ttl_s: float = LEASE_TTL_S) -> None:
        self._db = db
        self._clock = clock
        self._lease_ttl_s = lease_ttl_s
        # A request ends on the event loop's thread; its release (a database write) is queued to
        # this one thread instead of blocking the loop. Admissions and counts through this limiter
        # wait for the queue first, so a server never misses its own releases.
        self._releases = ThreadPoolExecutor(1, "limits-release")
        self._last_release: Future[None] | None = None
        self._queue_lock = threading.Lock()

    def _settle(self) -> None:
        """Wait until this limiter's queued releases are written."""
        with self._queue_lock:
            last = self._last_release
        if last is not None:
            last.exception()  # waits; a failed release was logged where it failed

    def admit(self, subjects: Mapping[str, Limits]) -> Lease:
        """Admit one request for every subject or raise 429; nothing is recorded when refused."""
        self._settle()
        now = self._clock()
        ticket = secrets.token_hex(8)
        with self._db.session() as s:
            self._lock(s, sorted(subjects), now)  # sorted: two admissions lock shared subjects in one order
            for subject, limits in subjects.items():
                check_room(subjects, subject, limits, self._room(s, subject, now), now)
            for i, subject in enumerate(subjects):
                s.add(RateEventRow(subject=subject, at=now, requests=1, tokens=0))
                s.add(RateLeaseRow(id=f"{ticket}-{i}", subject=subject, expires_at=now + self._lease_ttl_s))
        return Lease(self, list(subjects), ticket)

    def _lock(self, s: Session, subjects: list[str], now: float) -> None:
        dialect = s.get_bind().dialect.name
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        for subject in subjects:
            s.execute(insert(RateSubjectRow).values(subject=subject, touched_at=now).on_conflict_do_nothing())
        s.execute(update(RateSubjectRow).where(RateSubjectRow.subject.in_(subjects)).values(touched_at=now))
        # What fell out of the window is no longer needed by anyone.
        s.execute(delete(RateEventRow).where(RateEventRow.subject.in_(subjects), RateEventRow.at <= now - WINDOW_S))
        s.execute(delete(RateLeaseRow).where(RateLeaseRow.subject.in_(subjects), RateLeaseRow.expires_at <= now))

    @staticmethod
    def _room(s: Session, subject: str, now: float) -> Room:
        recent = (RateEventRow.subject == subject, RateEventRow.at > now - WINDOW_S)
        requests, oldest_request = s.execute(
            select(func.count(), func.min(RateEventRow.at)).where(*recent, RateEventRow.requests > 0)
        ).one()
        tokens, oldest_tokens = s.execute(
            select(func.coalesce(func.sum(RateEventRow.tokens), 0), func.min(RateEventRow.at)).where(
                *recent, RateEventRow.tokens > 0
            )
        ).one()
        concurrent = s.scalar(
            select(func.count()).where(RateLeaseRow.subject == subject, RateLeaseRow.expires_at > now)
        )
        return Room(
            concurrent=int(concurrent or 0),
            requests=int(requests),
            oldest_request=oldest_request,
            tokens=int(tokens),
            oldest_tokens=oldest_tokens,
        )

    def _release(self, subjects: list[str], tokens: int, ticket: str | None) -> None:
        now = self._clock()
        with self._queue_lock:
            self._last_release = self._releases.submit(self._write_release, subjects, tokens, ticket, now)

    def _write_release(self, subjects: list[str], tokens: int, ticket: str | None, now: float) -> None:
        try:
            with self._db.session() as s:
                if ticket is not None:
                    leases = [f"{ticket}-{i}" for i in range(len(subjects))]
                    s.execute(delete(RateLeaseRow).where(RateLeaseRow.id.in_(leases)))
                if tokens:
                    for subject in subjects:
                        s.add(RateEventRow(subject=subject, at=now, requests=0, tokens=tokens))
        except Exception:  # the lease then lapses after its TTL; serving goes on
            log.exception("could not record the end of a request in the shared limits")
            raise

    def close(self) -> None:
        """Write the queued releases and stop the writer thread."""
        self._releases.shutdown(wait=True)

    def concurrent(self, subject: str) -> int:
        self._settle()
        now = self._clock()
        with self._db.session() as s:
            return self._room(s, subject, now).concurrent
