"""Eval-gated promotion: a candidate takes an alias from its current model only if, scored on the same
held-out items, it is better by a margin and the paired bootstrap interval of the difference lies
above zero (``evals/bootstrap.py``). The decision is kept in the candidate's lineage (its ``extra``
as ``promotions``), whether the gate passed or an admin overrode it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from llmos.errors import ConflictError
from llmos.evals.bootstrap import DEFAULT_CONFIDENCE, paired_bootstrap
from llmos.registry.db import Database
from llmos.registry.tables import ModelRow

MAX_DECISIONS = 20
"""Promotion decisions kept in a model's lineage (the newest; every one is also in the audit log)."""


@dataclass(frozen=True)
class Decision:
    """A comparison of a candidate with an alias's current model (the baseline) on the same items."""

    alias: str
    candidate_id: str
    baseline_id: str
    items: int
    candidate_mean: float
    baseline_mean: float
    difference: float
    """Mean of candidate minus baseline over the items."""
    low: float
    high: float
    """The ``confidence`` paired bootstrap interval of ``difference``."""
    confidence: float
    margin: float
    better: bool
    """Whether the gate passed: ``difference >= margin`` and ``low > 0``."""
    source: dict[str, Any] = field(default_factory=dict)
    """Where the scores come from (the eval and its two runs)."""
    overridden: bool = False
    """Promoted by an admin although the gate did not pass."""

    def public(self) -> dict[str, Any]:
        return asdict(self)

    def explain(self) -> str:
        return (
            f"the candidate scores {self.candidate_mean:.4f} against {self.baseline_mean:.4f} for {self.alias}'s "
            f"current model on {self.items} items: a difference of {self.difference:+.4f}, "
            f"{self.confidence:.0%} interval [{self.low:+.4f}, {self.high:+.4f}]"
        )


def decide(
    alias: str,
    candidate_id: str,
    baseline_id: str,
    candidate: Sequence[float],
    baseline: Sequence[float],
    *,
    margin: float,
    source: dict[str, Any],
    confidence: float = DEFAULT_CONFIDENCE,
) -> Decision:
    """Compare per-item scores of the two models (``candidate[i]`` and ``baseline[i]`` of one item).
    The bootstrap's seed is fixed, so the same scores always give the same decision."""
    difference, low, high = paired_bootstrap(candidate, baseline, confidence=confidence, seed=0)
    return Decision(
        alias=alias,
        candidate_id=candidate_id,
        baseline_id=baseline_id,
        items=len(candidate),
        candidate_mean=sum(candidate) / len(candidate),
        baseline_mean=sum(baseline) / len(baseline),
        difference=difference,
        low=low,
        high=high,
        confidence=confidence,
        margin=margin,
        better=difference >= margin and low > 0.0,
        source=source,
    )


def refusal(decision: Decision) -> ConflictError:
    """The 409 a promotion gets when its candidate is not shown better."""
    needs = f"a difference of at least {decision.margin:g} with an interval above zero"
    return ConflictError(
        f"promotion refused: {decision.explain()}; promotion needs {needs} (an admin may set override)",
        param="eval",
        code="promotion_not_better",
    )


def record(db: Database, decision: Decision) -> None:
    """Append the decision to the candidate's lineage (``extra.promotions``, the newest last)."""
    entry = {**decision.public(), "decided_at": int(datetime.now(UTC).timestamp())}
    with db.session() as s:
        row = s.get(ModelRow, decision.candidate_id)
        if row is None:  # deleted meanwhile: the alias's cascade has taken the promotion with it
            return
        extra = dict(row.extra or {})
        extra["promotions"] = [*extra.get("promotions", []), entry][-MAX_DECISIONS:]
        row.extra = extra
