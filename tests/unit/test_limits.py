from __future__ import annotations

import pytest

from llmos.errors import InvalidRequestError, RateLimitError
from llmos.security.limits import Limits, RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_with_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
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


def test_tokens_per_minute_charged_at_release() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = {"key:k": Limits(tokens_per_minute=100)}
    limiter.admit(limits).release(tokens=120)
    with pytest.raises(RateLimitError) as exc:
        limiter.admit(limits)
    assert exc.value.code == "tokens_limit_exceeded"
    clock.now += 61
    limiter.admit(limits).release()


def test_concurrency_limit_and_release_once() -> None:
    limiter = RateLimiter(Clock())
    limits = {"tenant:a": Limits(max_concurrent_requests=1)}
    lease = limiter.admit(limits)
    with pytest.raises(RateLimitError) as exc:
        limiter.admit(limits)
    assert exc.value.code == "concurrency_limit_exceeded"
    lease.release()
    lease.release()  # a second release changes nothing
    assert limiter.concurrent("tenant:a") == 0
    limiter.admit(limits)


def test_one_subject_over_its_limit_refuses_without_counting_the_others() -> None:
    limiter = RateLimiter(Clock())
    subjects = {"tenant:a": Limits(), "key:k": Limits(requests_per_minute=2)}
    limiter.admit(subjects)
    limiter.admit(subjects)
    with pytest.raises(RateLimitError):
        limiter.admit(subjects)
    assert limiter.concurrent("tenant:a") == 2  # the refused request was not admitted anywhere


def test_other_tenants_are_unaffected() -> None:
    limiter = RateLimiter(Clock())
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
