"""What a promotion's ``eval`` names, read and checked: two completed runs of one eval over the same
items, one of the candidate and one of the alias's current model, their per-item scores paired by
item (``evals/compare.py``'s matching, shared with ``GET /v1/evals/{id}/compare``). The decision
itself is ``registry/promotion.py``'s."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from typing import Any

from llmos.errors import InvalidRequestError, LLMOSError, NotFoundError
from llmos.evals import compare
from llmos.evals.runs import Run, RunStore
from llmos.evals.store import EvalStore
from llmos.platform import Platform
from llmos.registry.aliases import Alias, is_alias

_FIELDS = {"eval_id", "candidate_run", "baseline_run", "criterion"}


@dataclass(frozen=True)
class EvalComparison:
    eval_id: str
    candidate_run: str
    baseline_run: str
    criterion: str | None
    """A testing criterion's own score; None: the share of the eval's criteria each item passed."""


@dataclass(frozen=True)
class PairedScores:
    candidate: list[float]
    baseline: list[float]
    source: dict[str, Any]


def parse_comparison(value: Any) -> EvalComparison:
    """The ``eval`` field of a promotion; missing or malformed is a 400 naming the field."""
    if value is None:
        raise InvalidRequestError(
            "a promotion names the eval that compares the candidate with the alias's current model: "
            "eval is required ({eval_id, candidate_run, baseline_run})",
            param="eval",
            code="promotion_needs_eval",
        )
    if not isinstance(value, dict):
        raise InvalidRequestError("eval must be an object {eval_id, candidate_run, baseline_run}", param="eval")
    unknown = sorted(set(value) - _FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown field '{unknown[0]}'", param=f"eval.{unknown[0]}")
    for name in ("eval_id", "candidate_run", "baseline_run"):
        if not isinstance(value.get(name), str) or not value[name]:
            raise InvalidRequestError(f"eval.{name} is required and must be a string", param=f"eval.{name}")
    criterion = value.get("criterion")
    if criterion is not None and (not isinstance(criterion, str) or not criterion):
        raise InvalidRequestError("eval.criterion must be a testing criterion's name", param="eval.criterion")
    return EvalComparison(value["eval_id"], value["candidate_run"], value["baseline_run"], criterion)


def paired_scores(
    platform: Platform, tenant: str, comparison: EvalComparison, *, candidate_id: str, current: Alias
) -> PairedScores:
    """The two runs' per-item scores, in item order, once checked: both the caller's, completed, of
    the same eval and items, the candidate run of ``candidate_id`` and the baseline run of the
    alias's current target. Blocking (database)."""
    try:
        EvalStore(platform.db).get(tenant, comparison.eval_id)
    except NotFoundError as exc:
        raise NotFoundError(exc.message, param="eval.eval_id") from exc
    runs = RunStore(platform.db)
    candidate = _run(runs, tenant, comparison, "candidate_run")
    baseline = _run(runs, tenant, comparison, "baseline_run")
    compare.require_same_items(candidate, baseline, "eval.baseline_run")
    _check_model(platform, candidate, candidate_id, "eval.candidate_run", "the candidate")
    _check_model(platform, baseline, current.model_id, "eval.baseline_run", f"{current.ref}'s current model")
    paired = compare.paired_scores(runs, candidate, baseline, comparison.criterion)
    if not paired.a or paired.unpaired:
        raise InvalidRequestError(
            f"the runs have scores for {len(paired.a)} items in common and {paired.unpaired} apart, "
            "not the same ones" + (f" for criterion {comparison.criterion!r}" if comparison.criterion else ""),
            param="eval.criterion" if comparison.criterion else "eval",
            code="eval_items_differ",
        )
    source = {
        "eval_id": comparison.eval_id,
        "candidate_run": candidate.id,
        "baseline_run": baseline.id,
        "criterion": comparison.criterion,
    }
    return PairedScores(paired.a, paired.b, source)


def _run(runs: RunStore, tenant: str, comparison: EvalComparison, field: str) -> Run:
    try:
        run = runs.get(tenant, comparison.eval_id, getattr(comparison, field))
    except NotFoundError as exc:
        raise NotFoundError(exc.message, param=f"eval.{field}") from exc
    compare.require_completed(run, f"eval.{field}", "a promotion")
    if run.generation is None:  # answers that came with the items: nothing shows a model gave them
        raise InvalidRequestError(
            f"run {run.id} graded answers given with its items; a promotion compares runs in which the model "
            "answered each item (data_source type 'completions' with model and input_messages)",
            param=f"eval.{field}",
            code="eval_run_not_generated",
        )
    return run


def _check_model(platform: Platform, run: Run, expected: str, param: str, what: str) -> None:
    """The run must have evaluated the model ``expected``, as its reference resolves now: a run of
    ``name@alias`` counts as a run of the alias's target only if the alias has not changed since the
    run was created (moved since, or splitting traffic, another version may have answered), and no
    run counts for a version registered after it began (a plain name then named an older one)."""
    try:
        evaluated = platform.registry.get(run.model)
    except LLMOSError:
        evaluated = None
    name, _, after = run.model.partition("@")
    if evaluated is not None and is_alias(after):
        alias = platform.registry.aliases.get(name, after)
        if alias is None or alias.canaries or alias.updated_at > run.created_at:
            raise InvalidRequestError(
                f"run {run.id} evaluated {run.model}, which has changed since the run began; "
                "run the eval again naming the version (name@N)",
                param=param,
                code="eval_model_mismatch",
            )
    if evaluated is not None:
        registered = evaluated.created_at if evaluated.created_at.tzinfo else evaluated.created_at.replace(tzinfo=UTC)
        if registered > run.created_at:  # e.g. a plain name whose newest version came after the run
            raise InvalidRequestError(
                f"run {run.id} began before {evaluated.name}@{evaluated.version}, which {run.model} names now; "
                "run the eval again naming the version (name@N)",
                param=param,
                code="eval_model_mismatch",
            )
    if evaluated is None or evaluated.id != expected:
        shown = f"{evaluated.name}@{evaluated.version}" if evaluated is not None else repr(run.model)
        raise InvalidRequestError(
            f"run {run.id} evaluated {shown}, not {what}", param=param, code="eval_model_mismatch"
        )
