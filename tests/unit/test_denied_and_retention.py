"""Unauthenticated traffic costs nothing lasting: denied requests are throttled per address with no
database write each and audited aggregated; audit and usage rows go after their retention."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, select

from llmos.api import create_app
from llmos.errors import RateLimitError
from llmos.kernel.maintenance import MaintenanceLoop, run_maintenance
from llmos.platform import Platform
from llmos.registry.tables import AuditRow, UsageRow
from llmos.security.denied import DeniedRequests
from tests.conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_denied_requests_are_throttled_per_address_in_a_sliding_minute() -> None:
    clock = Clock()
    denied = DeniedRequests(3, clock=clock)
    for _ in range(3):
        denied.note(client="10.0.0.1", route="GET /v1/files", code="invalid_api_key")
    with pytest.raises(RateLimitError) as exc:
        denied.note(client="10.0.0.1", route="GET /v1/files", code="invalid_api_key")
    assert exc.value.retry_after == 60.0
    denied.note(client="10.0.0.2", route="GET /v1/files", code="invalid_api_key")  # another address: its own
    clock.now += 30
    with pytest.raises(RateLimitError) as exc:
        denied.note(client="10.0.0.1", route="GET /v1/models", code="missing_api_key")
    assert exc.value.retry_after == 30.0
    clock.now += 30.5
    denied.note(client="10.0.0.1", route="GET /v1/files", code="invalid_api_key")  # the minute has passed
    tallies = {(t.client, t.route): t for t in denied.drain()}
    first = tallies[("10.0.0.1", "GET /v1/files")]
    assert (first.count, first.throttled, dict(first.codes)) == (5, 1, {"invalid_api_key": 5})
    assert tallies[("10.0.0.1", "GET /v1/models")].throttled == 1
    assert denied.drain() == []


def test_tracked_addresses_and_tallies_stay_bounded() -> None:
    clock = Clock()
    denied = DeniedRequests(2, clock=clock, max_addresses=10, max_groups=5)
    for i in range(50):
        with contextlib.suppress(RateLimitError):  # the addresses beyond the bound share one allowance
            denied.note(client=f"10.0.{i}.1", route="GET /v1/files", code="invalid_api_key")
    assert len(denied._recent) <= 11
    tallies = denied.drain()
    assert len(tallies) <= 6 and sum(t.count for t in tallies) == 50
    clock.now += 61
    denied.note(client="10.9.9.9", route="GET /v1/files", code="invalid_api_key")  # idle addresses forgotten
    assert len(denied._recent) <= 2


def count_writes(platform: Platform) -> list[str]:
    writes: list[str] = []

    def before(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().split()[0].upper() in {"INSERT", "UPDATE", "DELETE"}:
            writes.append(statement)

    event.listen(platform.db.engine, "before_cursor_execute", before)
    return writes


def test_bad_keys_write_nothing_get_429_and_are_audited_in_one_row(platform: Platform) -> None:
    settings = platform.settings.model_copy(update={"maintenance_interval_s": 0})
    quick = dataclasses.replace(platform, settings=settings)
    quick.audit.denied.per_minute = 5
    with TestClient(create_app(platform=quick)) as http:
        assert http.get("/v1/files", headers=ADMIN).status_code == 200  # the valid key warms its cache
        writes = count_writes(platform)
        codes = [http.get("/v1/files", headers={"Authorization": "Bearer wrong"}).status_code for _ in range(8)]
        assert codes == [401] * 5 + [429] * 3
        throttled = http.get("/v1/models")
        assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) >= 1
        assert throttled.json()["error"]["code"] == "too_many_denied_requests"
        assert writes == []
        assert http.get("/v1/files", headers=ADMIN).status_code == 200  # a good key from the address still works

        rows = http.get("/v1/admin/audit", headers=ADMIN, params={"action": "auth.denied"}).json()["data"]
    by_route = {r["target"]: r for r in rows}
    assert set(by_route) == {"GET /v1/files", "GET /v1/models"}
    files = by_route["GET /v1/files"]
    assert files["client"] == "testclient" and files["outcome"] == "denied"
    assert files["detail"]["count"] == 8 and files["detail"]["throttled"] == 3
    assert files["detail"]["codes"] == {"invalid_api_key": 8}
    with platform.db.session() as s:
        assert s.scalar(select(func.count()).select_from(AuditRow).where(AuditRow.action == "auth.denied")) == 2


def test_maintenance_deletes_audit_and_usage_past_their_retention(platform: Platform) -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    with platform.db.session() as s:
        for age in (10, 400):
            s.add(AuditRow(at=now - timedelta(days=age), action="key.create", outcome="success", detail={}))
            s.add(
                UsageRow(
                    day=(now - timedelta(days=age)).strftime("%Y-%m-%d"),
                    tenant="acme",
                    key_id="k",
                    model="m",
                    kind="chat",
                    requests=1,
                    prompt_tokens=1,
                    completion_tokens=1,
                    cpu_seconds=0.0,
                )
            )
    platform.audit.denied.note(client="10.0.0.1", route="GET /v1/files", code="missing_api_key")
    settings = platform.settings.model_copy(update={"audit_retention_days": 365, "usage_retention_days": 30})
    done = run_maintenance(dataclasses.replace(platform, settings=settings), now=now.timestamp())
    assert (done["audit_rows"], done["usage_rows"], done["denied_tallies"]) == (1, 1, 1)
    with platform.db.session() as s:
        events = {r.action: r.at.replace(tzinfo=UTC) for r in s.scalars(select(AuditRow))}
        days = [r.day for r in s.scalars(select(UsageRow))]
    assert set(events) == {"key.create", "auth.denied"}  # the tally written by the run, the recent event kept
    assert (now - events["key.create"]).days == 10
    assert days == [(now - timedelta(days=10)).strftime("%Y-%m-%d")]


def test_retention_zero_keeps_everything(platform: Platform) -> None:
    with platform.db.session() as s:
        s.add(AuditRow(at=datetime(2000, 1, 1, tzinfo=UTC), action="key.create", outcome="success", detail={}))
    settings = platform.settings.model_copy(update={"audit_retention_days": 0, "usage_retention_days": 0})
    done = run_maintenance(dataclasses.replace(platform, settings=settings))
    assert (done["audit_rows"], done["usage_rows"]) == (0, 0)
    assert len(platform.audit.query(action="key.create")) == 1


def test_the_maintenance_loop_runs_on_its_interval_until_stopped() -> None:
    runs = threading.Semaphore(0)
    loop = MaintenanceLoop(runs.release, interval_s=0.01)
    loop.start()
    assert runs.acquire(timeout=30) and runs.acquire(timeout=30)  # it repeats
    loop.stop()
    while runs.acquire(blocking=False):
        pass
    assert not runs.acquire(timeout=0.1)  # and stops
