from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from llmos.errors import InvalidRequestError, RateLimitError
from llmos.registry.db import Database
from llmos.security.limits import Limiter, Limits, RateLimiter
from llmos.security.shared_limits import DatabaseRateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


MakeLimiter = Callable[[Callable[[], float]], Limiter]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(f"sqlite:///{tmp_path / 'limits.db'}")
    yield database
    database.dispose()


@pytest.fixture(params=["memory", "database"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> MakeLimiter:
    """Every rule is checked on both limiters: this process's memory and the shared database."""
    if request.param == "memory":
        return RateLimiter
    db: Database = request.getfixturevalue("db")
    return lambda clock: DatabaseRateLimiter(db, clock)


def test_requests_per_minute_with_retry_after(make: MakeLimiter) -> None:
    clock = Clock()
    limiter = make(clock)
    limits = {"tenant:a": Limits(requests_per_minute=2)}
    limiter.admit(limits).release()
    clock.now += 10
    limiter.admit(limits).release()
    with pytest.raises(RateLimitError) as exc:
        limiter.admit(limits)
    assert exc.value.code == "rate_limit_exceeded"
    assert 49 <= exc.value.retry_after <= 51  # the first request leaves the window in 50 s
    clock.now += 51
    limiter.admit(limits).release()


def test_tokens_per_minute_charged_at_release(make: MakeLimiter) -> None:
    clock = Clock()
    limiter = make(clock)
    limits = {"key:k": Limits(tokens_per_minute=100)}
    limiter.admit(limits).release(tokens=120)
    with pytest.raises(RateLimitError) as exc:
        limiter.admit(limits)
    assert exc.value.code == "tokens_limit_exceeded"
    clock.now += 61
    limiter.admit(limits).release()


def test_concurrency_limit_and_release_once(make: MakeLimiter) -> None:
    limiter = make(Clock())
    limits = {"tenant:a": Limits(max_concurrent_requests=1)}
    lease = limiter.admit(limits)
    with pytest.raises(RateLimitError) as exc:
        limiter.admit(limits)
    assert exc.value.code == "concurrency_limit_exceeded"
    lease.release()
    lease.release()  # a second release changes nothing
    assert limiter.concurrent("tenant:a") == 0
    limiter.admit(limits)


def test_one_subject_over_its_limit_refuses_without_counting_the_others(make: MakeLimiter) -> None:
    limiter = make(Clock())
    subjects = {"tenant:a": Limits(), "key:k": Limits(requests_per_minute=2)}
    limiter.admit(subjects)
    limiter.admit(subjects)
    with pytest.raises(RateLimitError):
        limiter.admit(subjects)
    assert limiter.concurrent("tenant:a") == 2  # the refused request was not admitted anywhere


def test_other_tenants_are_unaffected(make: MakeLimiter) -> None:
    limiter = make(Clock())
    limiter.admit({"tenant:a": Limits(requests_per_minute=1, max_concurrent_requests=1)})
    with pytest.raises(RateLimitError):
        limiter.admit({"tenant:a": Limits(requests_per_minute=1, max_concurrent_requests=1)})
    # tenant a is at both of its limits; tenant b's window is its own
    lease = limiter.admit({"tenant:b": Limits(requests_per_minute=1, max_concurrent_requests=1)})
    assert limiter.concurrent("tenant:b") == 1
    assert limiter.concurrent("tenant:a") == 1
    lease.release()
    assert limiter.concurrent("tenant:b") == 0
    assert limiter.concurrent("tenant:a") == 1


@pytest.mark.parametrize(
    "bad", [{"requests_per_minute": -1}, {"bogus": 1}, {"tokens_per_minute": "10"}, {"max_concurrent_requests": True}]
)
def test_limits_are_validated(bad: dict) -> None:
    with pytest.raises(InvalidRequestError):
        Limits.parse(bad)


def test_servers_on_one_database_share_limits_and_a_restart_keeps_them(db: Database) -> None:
    clock = Clock()
    first, second = DatabaseRateLimiter(db, clock), DatabaseRateLimiter(db, clock)
    limits = {"tenant:a": Limits(requests_per_minute=3, max_concurrent_requests=2, tokens_per_minute=50)}
    held = first.admit(limits)
    second.admit(limits).release(tokens=60)
    assert second.concurrent("tenant:a") == 1  # its own release is written; the first's request holds
    with pytest.raises(RateLimitError) as exc:  # the other server's tokens count here
        first.admit(limits)
    assert exc.value.code == "tokens_limit_exceeded"
    clock.now += 61  # tokens and requests leave the window; the held request still runs
    restarted = DatabaseRateLimiter(db, clock)
    assert restarted.concurrent("tenant:a") == 1
    restarted.admit(limits)
    with pytest.raises(RateLimitError) as exc:
        second.admit(limits)
    assert exc.value.code == "concurrency_limit_exceeded"
    held.release()
    assert first.concurrent("tenant:a") == 1  # its release is written; the restarted server's request holds
    second.admit(limits)


def test_a_dead_servers_requests_free_their_slots_after_the_lease(db: Database) -> None:
    clock = Clock()
    limits = {"key:k": Limits(max_concurrent_requests=1)}
    DatabaseRateLimiter(db, clock, lease_ttl_s=30).admit(limits)  # never released: its server died
    survivor = DatabaseRateLimiter(db, clock, lease_ttl_s=30)
    with pytest.raises(RateLimitError):
        survivor.admit(limits)
    clock.now += 31
    survivor.admit(limits)


def test_concurrent_admissions_on_two_servers_never_pass_the_limit(db: Database) -> None:
    servers = [DatabaseRateLimiter(db), DatabaseRateLimiter(Database(str(db.engine.url)))]
    limits = {"tenant:a": Limits(requests_per_minute=10)}

    def attempt(i: int) -> bool:
        try:
            servers[i % 2].admit(limits).release()
        except RateLimitError:
            return False
        return True

    with ThreadPoolExecutor(8) as pool:
        admitted = sum(pool.map(attempt, range(40)))
    assert admitted == 10
