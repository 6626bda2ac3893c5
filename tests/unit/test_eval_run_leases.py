"""Eval runs shared by several servers on one database (issue 18's noticed gap): two runners on one
database each grade only the runs they claimed, every item once; a run whose server fell silent is
taken over once its heartbeat is stale, and the silent runner, if it wakes, stops it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from llmos.api import create_app
from llmos.api.openai.evals.runner import EvalRunner
from llmos.evals.runs import UNFINISHED, RunStatus, RunStore
from llmos.kernel.leases import Leases
from llmos.platform import Platform
from llmos.registry.eval_tables import EvalRunRow
from tests.conftest import ADMIN_KEY

pytestmark = pytest.mark.filterwarnings("ignore:The Evals API is deprecated:DeprecationWarning")

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
ITEMS = [
    {"item": {"answer": "Paris"}, "sample": {"output_text": "Paris", "model": "m"}},
    {"item": {"answer": "Rome"}, "sample": {"output_text": "Rom", "model": "m"}},
    {"item": {"answer": "4"}, "sample": {"output_text": "4", "model": "m"}},
]


def queued_runs(platform: Platform, count: int) -> list[str]:
    """``count`` runs of a string-check eval, created by a server that grades nothing itself."""
    idle = dataclasses.replace(platform, settings=platform.settings.model_copy(update={"eval_concurrency": 0}))
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with TestClient(create_app(platform=idle)) as http:
        config = {"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True}
        created = http.post(
            "/v1/evals", json={"data_source_config": config, "testing_criteria": [EXACT]}, headers=headers
        )
        eval_id = created.json()["id"]
        source = {"type": "jsonl", "source": {"type": "file_content", "content": ITEMS}}
        runs = [
            http.post(f"/v1/evals/{eval_id}/runs", json={"data_source": source}, headers=headers) for _ in range(count)
        ]
    return [run.json()["id"] for run in runs]


def graded_by(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, int]]:
    """Records (runner, run, item) for every item a runner grades."""
    seen: list[tuple[str, str, int]] = []
    real = EvalRunner._grade

    async def counted(runner: EvalRunner, run: Any, evaluation: Any, key: Any, index: int) -> None:
        seen.append((runner.owner, run.id, index))
        await asyncio.sleep(0.05)  # grading takes a while: both runners look while runs are unfinished
        await real(runner, run, evaluation, key, index)

    monkeypatch.setattr(EvalRunner, "_grade", counted)
    return seen


def runner(platform: Platform) -> EvalRunner:
    return EvalRunner(platform, engine=None, poll_s=0.05)  # type: ignore[arg-type]  # string checks call no model


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    for _ in range(600):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("not reached")


def test_two_runners_on_one_database_grade_each_run_once(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_ids = queued_runs(loaded_platform, 4)
    seen = graded_by(monkeypatch)
    store = RunStore(loaded_platform.db)

    async def both() -> None:
        first, second = runner(loaded_platform), runner(loaded_platform)
        first.start()
        second.start()

        async def all_done() -> bool:
            statuses = await asyncio.to_thread(lambda: [store.status(r) for r in run_ids])
            return all(s is RunStatus.COMPLETED for s in statuses)

        try:
            await until(all_done)
        finally:
            await first.stop()
            await second.stop()

    asyncio.run(both())
    assert Counter((run, index) for _, run, index in seen) == {(r, i): 1 for r in run_ids for i in range(3)}
    for run_id in run_ids:
        assert len({owner for owner, run, _ in seen if run == run_id}) == 1  # one runner graded it all
        assert store.graded(run_id) == {0, 1, 2}


def test_a_run_whose_server_fell_silent_is_taken_over_and_the_silent_one_stops(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    (run_id,) = queued_runs(loaded_platform, 1)
    store = RunStore(loaded_platform.db)
    now = datetime.now(UTC)
    at = [now]
    # The heartbeats a server writes, at a time the test sets.
    heartbeats = Leases(loaded_platform.db, EvalRunRow, UNFINISHED, clock=lambda: at[0])

    def owner() -> str | None:
        with loaded_platform.db.session() as s:
            return s.scalar(select(EvalRunRow.owner).where(EvalRunRow.id == run_id))

    async def scenario() -> None:
        silent, other = runner(loaded_platform), runner(loaded_platform)
        stuck = asyncio.Event()
        real = EvalRunner._grade

        async def hangs_on_the_silent_one(r: EvalRunner, run: Any, evaluation: Any, key: Any, index: int) -> None:
            if r is silent:
                stuck.set()
                await asyncio.Event().wait()  # never graded: this server hangs, then falls silent
            graded_by_other.append(index)
            await real(r, run, evaluation, key, index)

        monkeypatch.setattr(EvalRunner, "_grade", hangs_on_the_silent_one)
        await silent.tick()  # claims the run and starts grading it
        await asyncio.wait_for(stuck.wait(), 30)
        await other.tick()
        assert owner() == silent.owner  # its holder is alive: left alone

        at[0] = now - timedelta(seconds=31)  # its last heartbeat was 31 s ago
        await asyncio.to_thread(heartbeats.beat, silent.owner, [run_id])
        await other.tick()  # takes it over
        assert owner() == other.owner
        await asyncio.wait_for(other.wait(run_id), 30)
        assert await asyncio.to_thread(store.status, run_id) is RunStatus.COMPLETED

        await silent.tick()  # wakes up: the run is no longer its own, so it stops grading it
        await asyncio.wait_for(silent.wait(run_id), 30)
        assert owner() == other.owner
        await silent.stop()
        await other.stop()

    graded_by_other: list[int] = []
    asyncio.run(scenario())
    assert store.graded(run_id) == {0, 1, 2} and sorted(graded_by_other) == [0, 1, 2]
