"""Two completed runs of one eval, compared item by item: the one matching of two runs' items that
both ``GET /v1/evals/{eval_id}/compare`` and eval-gated promotion (``api/promotion.py``) use, and
the comparison itself (each run's mean, the difference and its paired bootstrap interval), overall
and per testing criterion.

Items match by the item alone: two ``jsonl`` runs of two models carry each model's sample beside
the same item, and a ``completions`` run's items may carry samples its model replaced; comparing
whole entries would find no two runs of different models comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmos.errors import InvalidRequestError
from llmos.evals.bootstrap import DEFAULT_CONFIDENCE, DEFAULT_ITERATIONS, paired_bootstrap
from llmos.evals.runs import Run, RunStatus, RunStore
from llmos.evals.store import Eval

BOOTSTRAP_SEED = 0
"""Fixed, so the same two runs always give the same interval (a comparison can be cited)."""


def require_completed(run: Run, param: str, purpose: str = "a comparison") -> None:
    if run.status != RunStatus.COMPLETED:
        raise InvalidRequestError(
            f"run {run.id} is {run.status.value}; {purpose} compares completed runs",
            param=param,
            code="eval_run_not_completed",
        )


def require_same_items(a: Run, b: Run, param: str) -> None:
    """The two runs scored the same items in the same order (their samples may differ)."""
    if a.id == b.id:
        raise InvalidRequestError("a comparison needs two different runs", param=param)
    if [e["item"] for e in a.items] != [e["item"] for e in b.items]:
        raise InvalidRequestError(
            f"runs {a.id} and {b.id} scored different items; a paired comparison needs runs over the same items",
            param=param,
            code="eval_items_differ",
        )


@dataclass(frozen=True)
class Paired:
    a: list[float]
    b: list[float]
    """Each run's scores of the items both scored, in item order."""
    unpaired: int
    """Items only one of the runs has a score for (errored for a named criterion)."""


def paired_scores(runs: RunStore, a: Run, b: Run, criterion: str | None) -> Paired:
    """The runs' per-item scores (``RunStore.per_item_scores``) paired by item index."""
    ours, theirs = runs.per_item_scores(a.id, criterion), runs.per_item_scores(b.id, criterion)
    common = sorted(ours.keys() & theirs.keys())
    return Paired([ours[i] for i in common], [theirs[i] for i in common], len(ours.keys() ^ theirs.keys()))


def difference(paired: Paired) -> dict[str, Any]:
    """Means of ``a`` and ``b``, ``a - b`` and its paired bootstrap interval (None without items)."""
    n = len(paired.a)
    if not n:
        return {"items": 0, "unpaired": paired.unpaired, "mean_a": None, "mean_b": None, "difference": None}
    diff, low, high = paired_bootstrap(paired.a, paired.b, seed=BOOTSTRAP_SEED)
    return {
        "items": n,
        "unpaired": paired.unpaired,
        "mean_a": sum(paired.a) / n,
        "mean_b": sum(paired.b) / n,
        "difference": diff,
        "interval": [low, high],
        "excludes_zero": low > 0.0 or high < 0.0,
    }


def compare_runs(runs: RunStore, evaluation: Eval, a: Run, b: Run) -> dict[str, Any]:
    """``a`` against ``b`` (both completed runs of ``evaluation`` over the same items): overall (the
    share of the criteria each item passed) and per testing criterion (its grader's score)."""
    require_completed(a, "run_a")
    require_completed(b, "run_b")
    require_same_items(a, b, "run_b")
    return {
        "object": "eval.comparison",
        "eval_id": evaluation.id,
        "run_a": {"id": a.id, "name": a.name, "model": a.model},
        "run_b": {"id": b.id, "name": b.name, "model": b.model},
        "confidence": DEFAULT_CONFIDENCE,
        "iterations": DEFAULT_ITERATIONS,
        "overall": difference(paired_scores(runs, a, b, None)),
        "per_testing_criteria": [
            {"testing_criteria": g.name, **difference(paired_scores(runs, a, b, g.name))} for g in evaluation.graders
        ],
    }
