"""Quotas and rate limits per tenant and per key: requests and tokens per minute, concurrency.

In-memory sliding windows here (one process serves the API; ``limits_store = "database"`` keeps
them in the database instead, shared by every server on it: ``security.shared_limits``); the clock
is injected so the logic is tested without sleeping. A request is admitted only if every subject
(its tenant and its key) has room; tokens are charged when the request ends, from what it used.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from llmos.errors import InvalidRequestError, RateLimitError
from llmos.monitoring import metrics

WINDOW_S = 60.0


@dataclass(frozen=True)
class Limits:
    """None means unlimited."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    max_concurrent_requests: int | None = None
    max_concurrent_jobs: int | None = None
    training_cpu_seconds: int | None = None
    storage_bytes: int | None = None

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None, *, param: str = "limits") -> Limits:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequestError(f"unknown limits {sorted(unknown)}; known: {sorted(known)}", param=param)
        for name, value in data.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise InvalidRequestError(
                    f"limit {name} must be a non-negative integer or null", param=f"{param}.{name}"
                )
        return cls(**data)

    def as_dict(self) -> dict[str, int | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class _Window:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0
    concurrent: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW_S:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


class Releases(Protocol):
    def _release(self, subjects: list[str], tokens: int, ticket: str | None) -> None: ...


@dataclass(frozen=True)
class Room:
    """What a subject used in the last ``WINDOW_S`` seconds (times in the limiter's clock)."""

    concurrent: int
    requests: int
    oldest_request: float | None
    tokens: int
    oldest_tokens: float | None


def check_room(subjects: Mapping[str, Limits], subject: str, limits: Limits, room: Room, now: float) -> None:
    """Raise 429 if ``subject`` has no room for one more request (counted in the metrics under the
    tenant among ``subjects``); one set of rules for every limiter."""
    try:
        _check(subject, limits, room, now)
    except RateLimitError as exc:
        tenant = next((s.removeprefix("tenant:") for s in subjects if s.startswith("tenant:")), "")
        metrics.QUOTA_REJECTIONS.labels(tenant, exc.code or "rate_limit").inc()
        raise


def _check(subject: str, limits: Limits, room: Room, now: float) -> None:
    who = subject.replace(":", " ")
    if limits.max_concurrent_requests is not None and room.concurrent >= limits.max_concurrent_requests:
        raise RateLimitError(
            f"Too many concurrent requests for {who} (limit {limits.max_concurrent_requests}).",
            retry_after=1.0,
            code="concurrency_limit_exceeded",
        )
    if limits.requests_per_minute is not None and room.requests >= limits.requests_per_minute:
        wait = room.oldest_request + WINDOW_S - now if room.oldest_request is not None else WINDOW_S
        raise RateLimitError(
            f"Rate limit reached for {who}: {limits.requests_per_minute} requests per minute.",
            retry_after=max(1.0, wait),
            code="rate_limit_exceeded",
        )
    if limits.tokens_per_minute is not None and room.tokens >= limits.tokens_per_minute:
        wait = room.oldest_tokens + WINDOW_S - now if room.oldest_tokens is not None else WINDOW_S
        raise RateLimitError(
            f"Rate limit reached for {who}: {limits.tokens_per_minute} tokens per minute.",
            retry_after=max(1.0, wait),
            code="tokens_limit_exceeded",
        )


class Limiter(Protocol):
    """What the API asks of a limiter: in this process's memory (``RateLimiter``) or in the
    database, shared by every server on it (``shared_limits.DatabaseRateLimiter``)."""

    def admit(self, subjects: Mapping[str, Limits]) -> Lease: ...

    def concurrent(self, subject: str) -> int: ...

    def close(self) -> None: ...


class Lease:
    """An admitted request: release it once, charging the tokens it used."""

    def __init__(self, limiter: Releases, subjects: list[str], ticket: str | None = None) -> None:
        self._limiter = limiter
        self._subjects = subjects
        self._ticket = ticket  # what a shared limiter needs to find this lease again
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self, tokens: int = 0) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self._subjects, tokens, self._ticket)


class RateLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def admit(self, subjects: Mapping[str, Limits]) -> Lease:
        """Admit one request for every subject (e.g. ``{"tenant:acme": ..., "key:ab12": ...}``) or raise 429."""
        now = self._clock()
        with self._lock:
            for subject, limits in subjects.items():
                window = self._windows.setdefault(subject, _Window())
                window.expire(now)
                room = Room(
                    concurrent=window.concurrent,
                    requests=len(window.requests),
                    oldest_request=window.requests[0] if window.requests else None,
                    tokens=window.token_sum,
                    oldest_tokens=window.tokens[0][0] if window.tokens else None,
                )
                check_room(subjects, subject, limits, room, now)
            for subject in subjects:
                window = self._windows[subject]
                window.requests.append(now)
                window.concurrent += 1
        return Lease(self, list(subjects))

    def _release(self, subjects: list[str], tokens: int, ticket: str | None = None) -> None:
        now = self._clock()
        with self._lock:
            for subject in subjects:
                window = self._windows.setdefault(subject, _Window())
                window.concurrent = max(0, window.concurrent - 1)
                if tokens:
                    window.tokens.append((now, tokens))
                    window.token_sum += tokens

    def concurrent(self, subject: str) -> int:
        with self._lock:
            window = self._windows.get(subject)
            return window.concurrent if window else 0

    def close(self) -> None:
        """Nothing is pending: every release is applied when it is made."""
