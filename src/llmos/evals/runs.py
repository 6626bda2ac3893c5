"""Eval runs as stored: a run's items and state, each graded item recorded once, and the summaries
read from them (result counts, per-criterion results, per-model usage, per-item scores).

A run is a job of the kernel that runs in the server (``api/openai/evals/runner.py``), as batches
do; its status changes only through ``_move``: legal per ``TRANSITIONS`` and a compare-and-set on
the status read, so a cancel and the runner's own end never both win.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from llmos.errors import InvalidRequestError, NotFoundError
from llmos.evals.data import Generation, RunData
from llmos.evals.store import Eval, not_found
from llmos.registry.completions import as_utc
from llmos.registry.db import Database
from llmos.registry.eval_tables import EvalOutputItemRow, EvalRow, EvalRunRow


class RunStatus(StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


TRANSITIONS: dict[RunStatus, frozenset[RunStatus]] = {
    RunStatus.QUEUED: frozenset({RunStatus.IN_PROGRESS, RunStatus.CANCELED, RunStatus.FAILED}),
    RunStatus.IN_PROGRESS: frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED}),
    RunStatus.COMPLETED: frozenset(),
    RunStatus.FAILED: frozenset(),
    RunStatus.CANCELED: frozenset(),
}
UNFINISHED = (RunStatus.QUEUED, RunStatus.IN_PROGRESS)
ITEM_STATUSES = ("pass", "fail", "error")


@dataclass(frozen=True)
class Run:
    id: str
    eval_id: str
    tenant: str
    key_id: str | None
    name: str
    model: str
    status: RunStatus
    data_source: dict[str, Any]
    items: list[dict[str, Any]]
    generation: Generation | None
    error: dict[str, Any] | None
    metadata: dict[str, str] | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: EvalRunRow) -> Run:
        return cls(
            id=row.id,
            eval_id=row.eval_id,
            tenant=row.tenant,
            key_id=row.key_id,
            name=row.name,
            model=row.model,
            status=RunStatus(row.status),
            data_source=row.data_source,
            items=row.items,
            generation=Generation.from_stored(row.generation) if row.generation else None,
            error=row.error,
            metadata=row.run_metadata,
            created_at=as_utc(row.created_at),
        )

    def public(self, summary: RunSummary) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "eval.run",
            "eval_id": self.eval_id,
            "name": self.name,
            "model": self.model,
            "status": self.status.value,
            "created_at": int(self.created_at.timestamp()),
            "data_source": self.data_source,
            "error": self.error,
            "metadata": self.metadata,
            "report_url": f"/v1/evals/{self.eval_id}/runs/{self.id}/output_items",
            **summary.public(),
        }


@dataclass
class RunSummary:
    """What a run's graded items add up to."""

    counts: dict[str, int]
    criteria: dict[str, list[int]]
    usage: dict[str, dict[str, int]]

    def public(self) -> dict[str, Any]:
        return {
            "result_counts": {
                "total": sum(self.counts.values()),
                "passed": self.counts["pass"],
                "failed": self.counts["fail"],
                "errored": self.counts["error"],
            },
            "per_testing_criteria_results": [
                {"testing_criteria": name, "passed": passed, "failed": failed}
                for name, (passed, failed) in self.criteria.items()
            ],
            "per_model_usage": [
                {
                    "model_name": model,
                    "invocation_count": u["invocation_count"],
                    "prompt_tokens": u["prompt_tokens"],
                    "completion_tokens": u["completion_tokens"],
                    "total_tokens": u["prompt_tokens"] + u["completion_tokens"],
                    "cached_tokens": 0,
                }
                for model, u in self.usage.items()
            ],
        }


def _run_not_found(run_id: str) -> NotFoundError:
    return NotFoundError(f"No eval run found with id '{run_id[:80]}'", param="run_id")


class RunStore:
    def __init__(self, db: Database, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.db = db
        self.clock = clock

    # -- what the API asks -------------------------------------------------------------------
    def create(
        self,
        evaluation: Eval,
        *,
        key_id: str | None,
        name: str | None,
        metadata: dict[str, str] | None,
        data_source: dict[str, Any],
        data: RunData,
    ) -> Run:
        run_id = f"evalrun_{uuid.uuid4().hex}"
        row = EvalRunRow(
            id=run_id,
            eval_id=evaluation.id,
            tenant=evaluation.tenant,
            key_id=key_id,
            name=name or run_id,
            model=data.model,
            status=RunStatus.QUEUED.value,
            data_source=data_source,
            items=data.items,
            generation=data.generation.stored() if data.generation else None,
            run_metadata=metadata,
            created_at=self.clock(),
        )
        with self.db.session() as s:
            if s.get(EvalRow, evaluation.id) is None:  # deleted while the request was checked
                raise not_found(evaluation.id)
            s.add(row)
            s.flush()
            return Run.from_row(row)

    def get(self, tenant: str, eval_id: str, run_id: str) -> Run:
        with self.db.session() as s:
            row = s.get(EvalRunRow, run_id[:64])
            if row is None or row.tenant != tenant or row.eval_id != eval_id:
                raise _run_not_found(run_id)
            return Run.from_row(row)

    def page(
        self, tenant: str, eval_id: str, *, after: str | None, limit: int, order: str, status: str | None
    ) -> tuple[list[Run], bool]:
        with self.db.session() as s:
            q = select(EvalRunRow).where(EvalRunRow.tenant == tenant, EvalRunRow.eval_id == eval_id)
            if status is not None:
                q = q.where(EvalRunRow.status == status)
            rows = list(s.scalars(q))
        rows.sort(key=lambda r: (as_utc(r.created_at), r.id), reverse=order == "desc")
        if after is not None:
            ids = [r.id for r in rows]
            if after not in ids:
                raise InvalidRequestError(f"No eval run found with id '{after[:80]}'", param="after")
            rows = rows[ids.index(after) + 1 :]
        return [Run.from_row(r) for r in rows[:limit]], len(rows) > limit

    def cancel(self, tenant: str, eval_id: str, run_id: str) -> Run:
        """Stop a queued or running run; its graded items stay."""
        run = self.get(tenant, eval_id, run_id)
        return self._move(run, RunStatus.CANCELED)

    def delete(self, tenant: str, eval_id: str, run_id: str) -> None:
        """Delete a run and its output items (a running one stops: its runner finds it gone)."""
        self.get(tenant, eval_id, run_id)
        with self.db.session() as s:
            row = s.get(EvalRunRow, run_id)
            if row is not None:
                s.delete(row)

    def summaries(self, run_ids: list[str]) -> dict[str, RunSummary]:
        """Each run's counts, per-criterion results and per-model usage, from its graded items."""
        out = {
            run_id: RunSummary(dict.fromkeys(ITEM_STATUSES, 0), defaultdict(lambda: [0, 0]), {}) for run_id in run_ids
        }
        if not run_ids:
            return out
        with self.db.session() as s:
            q = select(
                EvalOutputItemRow.run_id, EvalOutputItemRow.status, EvalOutputItemRow.results, EvalOutputItemRow.usage
            ).where(EvalOutputItemRow.run_id.in_(run_ids))
            for run_id, status, results, usage in s.execute(q):
                summary = out[run_id]
                summary.counts[status] += 1
                for result in results:
                    summary.criteria[result["name"]][0 if result["passed"] else 1] += 1
                for model, spent in usage.items():
                    total = summary.usage.setdefault(
                        model, {"invocation_count": 0, "prompt_tokens": 0, "completion_tokens": 0}
                    )
                    for name in total:
                        total[name] += int(spent.get(name, 0))
        for summary in out.values():
            summary.criteria = dict(summary.criteria)
        return out

    def public(self, runs: list[Run]) -> list[dict[str, Any]]:
        summaries = self.summaries([r.id for r in runs])
        return [r.public(summaries[r.id]) for r in runs]

    # -- output items ------------------------------------------------------------------------
    def output_items(
        self, run: Run, *, after: str | None, limit: int, order: str, status: str | None
    ) -> tuple[list[dict[str, Any]], bool]:
        with self.db.session() as s:
            q = select(EvalOutputItemRow).where(EvalOutputItemRow.run_id == run.id)
            if status is not None:
                q = q.where(EvalOutputItemRow.status == status)
            rows = sorted(s.scalars(q), key=lambda r: r.item_index, reverse=order == "desc")
        if after is not None:
            ids = [r.id for r in rows]
            if after not in ids:
                raise InvalidRequestError(f"No output item found with id '{after[:80]}'", param="after")
            rows = rows[ids.index(after) + 1 :]
        return [_output_item(run, r) for r in rows[:limit]], len(rows) > limit

    def output_item(self, run: Run, item_id: str) -> dict[str, Any]:
        with self.db.session() as s:
            row = s.get(EvalOutputItemRow, item_id[:64])
            if row is None or row.run_id != run.id:
                raise NotFoundError(f"No output item found with id '{item_id[:80]}'", param="output_item_id")
            return _output_item(run, row)

    def per_item_scores(self, run_id: str, criterion: str | None = None) -> dict[int, float]:
        """A run's score of each graded item, keyed by the item's index in the run's data source
        (``datasource_item_id``: two runs over the same items share their keys, which is how
        ``evals.bootstrap.paired_bootstrap`` pairs them).

        With ``criterion`` None the score is the share of the eval's testing criteria the item
        passed (an errored item scores 0); with a criterion's name, that grader's own score.
        Items not graded yet (or errored, for a named criterion) are left out."""
        with self.db.session() as s:
            q = select(EvalOutputItemRow.item_index, EvalOutputItemRow.score, EvalOutputItemRow.results)
            rows = list(s.execute(q.where(EvalOutputItemRow.run_id == run_id)))
        if criterion is None:
            return {index: float(score) for index, score, _ in rows}
        scores = {}
        for index, _, results in rows:
            for result in results:
                if result["name"] == criterion and "error" not in result:
                    scores[index] = float(result["score"])
        return scores

    def graded_samples(self, run_id: str) -> list[tuple[int, dict[str, Any]]]:
        """(item index, output item's ``sample``) of each item graded without error, in item order."""
        with self.db.session() as s:
            q = select(EvalOutputItemRow.item_index, EvalOutputItemRow.sample).where(
                EvalOutputItemRow.run_id == run_id, EvalOutputItemRow.status != "error"
            )
            return sorted((index, sample) for index, sample in s.execute(q))

    # -- what a runner does (which server runs a run: ``kernel.leases``) ----------------------
    def load(self, run_id: str) -> Run | None:
        with self.db.session() as s:
            row = s.get(EvalRunRow, run_id)
            return None if row is None else Run.from_row(row)

    def status(self, run_id: str) -> RunStatus | None:
        """A run's status alone (None: deleted), read before each item without its items' JSON."""
        with self.db.session() as s:
            value = s.scalar(select(EvalRunRow.status).where(EvalRunRow.id == run_id))
            return None if value is None else RunStatus(value)

    def graded(self, run_id: str) -> set[int]:
        with self.db.session() as s:
            q = select(EvalOutputItemRow.item_index).where(EvalOutputItemRow.run_id == run_id)
            return set(s.scalars(q))

    def record(
        self,
        run: Run,
        index: int,
        *,
        status: str,
        score: float,
        results: list[dict[str, Any]],
        sample: dict[str, Any],
        usage: dict[str, dict[str, int]],
    ) -> bool:
        """Record one graded item; False when it had been recorded already or its run is gone."""
        try:
            with self.db.session() as s:
                s.add(
                    EvalOutputItemRow(
                        id=f"outputitem_{uuid.uuid4().hex}",
                        run_id=run.id,
                        eval_id=run.eval_id,
                        item_index=index,
                        status=status,
                        score=score,
                        results=results,
                        sample=sample,
                        usage=usage,
                        created_at=self.clock(),
                    )
                )
        except IntegrityError:
            return False
        return True

    def start(self, run: Run) -> Run:
        return self._move(run, RunStatus.IN_PROGRESS) if run.status is RunStatus.QUEUED else run

    def finish(self, run: Run, target: RunStatus, error: dict[str, Any] | None = None) -> Run:
        return self._move(run, target, error=error)

    def _move(self, run: Run, target: RunStatus, **values: Any) -> Run:
        if target not in TRANSITIONS[run.status]:
            raise InvalidRequestError(
                f"eval run {run.id} is {run.status.value}; it cannot become {target.value}",
                param="run_id",
                code="invalid_run_state",
            )
        with self.db.session() as s:
            moved = s.execute(
                update(EvalRunRow)
                .where(EvalRunRow.id == run.id, EvalRunRow.status == run.status.value)
                .values(status=target.value, **values)
            )
            changed = moved.rowcount == 1  # type: ignore[attr-defined]
        current = self.load(run.id)
        if current is None:
            raise _run_not_found(run.id)
        if not changed:  # another request or runner moved it first: judge against what it is now
            return self._move(current, target, **values)
        return current


def _output_item(run: Run, row: EvalOutputItemRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "object": "eval.run.output_item",
        "eval_id": run.eval_id,
        "run_id": run.id,
        "created_at": int(as_utc(row.created_at).timestamp()),
        "status": row.status,
        "datasource_item_id": row.item_index,
        "datasource_item": run.items[row.item_index]["item"],
        "results": row.results,
        "sample": row.sample,
    }
