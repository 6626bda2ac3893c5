"""What a condition's value is, per label group, from the window's snapshots: PromQL's rate,
increase/delta, avg_over_time and histogram_quantile (without its extrapolation to the window's
edges: values come from the first and last snapshot inside the window), and the model-output
measures of ``drift.py``."""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence

from llmos.monitoring.alerts.catalog import CLASSIFICATION_CONFIDENCE, CLASSIFICATION_LABELS, MetricCatalog
from llmos.monitoring.alerts.drift import chisquare_p_value, jensen_shannon_distance
from llmos.monitoring.alerts.rules import (
    AverageCondition,
    Condition,
    ConfidenceCondition,
    IncreaseCondition,
    LabelDriftCondition,
    QuantileCondition,
    RateCondition,
    RatioCondition,
    Selector,
)
from llmos.monitoring.alerts.window import Labels, MetricWindow, Snapshot

GroupValues = dict[Labels, float]
"""A condition's value for each label group (the ``by`` labels and their values)."""


def evaluate(
    condition: Condition, by: Sequence[str], window: MetricWindow, catalog: MetricCatalog, now: float
) -> GroupValues:
    snapshots = window.between(now - condition.window, now)
    if len(snapshots) < 2:
        return {}  # nothing to compare yet (just started, or a window shorter than the interval)
    if isinstance(condition, RateCondition | IncreaseCondition):
        counter = catalog.kind(condition.metric) == "counter"
        name = catalog.sample_name(condition.metric)
        grown = _increase(snapshots, name, condition, by, counter=counter)
        if isinstance(condition, IncreaseCondition):
            return grown
        return {g: v / (snapshots[-1].at - snapshots[0].at) for g, v in grown.items()}
    if isinstance(condition, RatioCondition):
        top = _increase(snapshots, catalog.sample_name(condition.numerator.metric), condition.numerator, by)
        bottom = _increase(snapshots, catalog.sample_name(condition.denominator.metric), condition.denominator, by)
        return {g: top.get(g, 0.0) / v for g, v in bottom.items() if v > 0}
    if isinstance(condition, AverageCondition):
        return _average(snapshots, catalog.sample_name(condition.metric), condition, by)
    if isinstance(condition, QuantileCondition):
        return _quantile(snapshots, condition, by)
    if isinstance(condition, LabelDriftCondition):
        reference = window.between(now - condition.window - condition.reference_window, now - condition.window)
        return _label_drift(snapshots, reference, condition)
    return _mean_confidence(snapshots, condition)


def _matches(labels: Labels, selector: Selector) -> bool:
    present = dict(labels)
    if any(present.get(k) != v for k, v in selector.match.items()):
        return False
    return all(re.fullmatch(p, present.get(k, "")) for k, p in selector.match_re.items())


def _group(labels: Labels, by: Sequence[str]) -> Labels:
    present = dict(labels)
    return tuple((name, present.get(name, "")) for name in sorted(by))


def _series(snapshots: list[Snapshot], name: str, selector: Selector) -> set[Labels]:
    every: set[Labels] = set().union(*(s.series(name) for s in snapshots))
    return {labels for labels in every if _matches(labels, selector)}


def _increase(
    snapshots: list[Snapshot], name: str, selector: Selector, by: Sequence[str], *, counter: bool = True
) -> GroupValues:
    """Growth of each group's series from the first snapshot to the last: for a counter the
    difference of its reset-adjusted values (``window.py``), a series missing from the first
    snapshot created since, at 0; for a gauge its last value less its first (``delta``)."""
    out: GroupValues = defaultdict(float)
    if counter:
        first, last = snapshots[0].series(name), snapshots[-1].series(name)
        for labels in first.keys() | last.keys():
            if not _matches(labels, selector):
                continue
            start = first.get(labels, 0.0)
            out[_group(labels, by)] += last.get(labels, start) - start
        return dict(out)
    for labels in _series(snapshots, name, selector):
        present = [v for s in snapshots if (v := s.series(name).get(labels)) is not None]
        out[_group(labels, by)] += present[-1] - present[0]
    return dict(out)


def _average(snapshots: list[Snapshot], name: str, selector: Selector, by: Sequence[str]) -> GroupValues:
    sums: dict[Labels, list[float]] = defaultdict(list)
    groups = {labels: _group(labels, by) for labels in _series(snapshots, name, selector)}
    for snapshot in snapshots:
        at_once: dict[Labels, float] = defaultdict(float)
        for labels, value in snapshot.series(name).items():
            if labels in groups:
                at_once[groups[labels]] += value
        for group, value in at_once.items():
            sums[group].append(value)
    return {g: sum(v) / len(v) for g, v in sums.items()}


def _quantile(snapshots: list[Snapshot], condition: QuantileCondition, by: Sequence[str]) -> GroupValues:
    buckets = _increase(snapshots, f"{condition.metric}_bucket", condition, [*by, "le"])
    per_group: dict[Labels, list[tuple[float, float]]] = defaultdict(list)
    for labels, count in buckets.items():
        le = dict(labels)["le"]
        per_group[tuple((k, v) for k, v in labels if k != "le")].append((float(le), count))
    out: GroupValues = {}
    for group, cumulative in per_group.items():
        value = histogram_quantile(condition.quantile, sorted(cumulative))
        if value is not None:
            out[group] = value
    return out


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' estimate from cumulative ``(upper bound, count)`` buckets, sorted, the last
    +Inf: linear inside the bucket the rank falls in; a rank in +Inf gives the highest finite bound."""
    if not buckets or buckets[-1][1] <= 0 or not math.isinf(buckets[-1][0]):
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _label_counts(snapshots: list[Snapshot], model: str | None) -> dict[str, dict[str, float]]:
    """Classifications per model and label in the snapshots' span."""
    if len(snapshots) < 2:
        return {}
    selector = Selector(metric=CLASSIFICATION_LABELS, match={"model_name": model} if model else {})
    grown = _increase(snapshots, f"{CLASSIFICATION_LABELS}_total", selector, ["model_name", "label"])
    counts: dict[str, dict[str, float]] = defaultdict(dict)
    for labels, value in grown.items():
        fields = dict(labels)
        counts[fields["model_name"]][fields["label"]] = value
    return counts


def _label_drift(current: list[Snapshot], reference: list[Snapshot], condition: LabelDriftCondition) -> GroupValues:
    now_counts, before = _label_counts(current, condition.model), _label_counts(reference, condition.model)
    out: GroupValues = {}
    for model, counts in now_counts.items():
        past = before.get(model, {})
        if sum(counts.values()) < condition.min_samples or sum(past.values()) < condition.min_samples:
            continue
        labels = sorted(set(counts) | set(past))
        observed, expected = [counts.get(x, 0.0) for x in labels], [past.get(x, 0.0) for x in labels]
        if condition.method == "jensenshannon":
            out[(("model_name", model),)] = jensen_shannon_distance(expected, observed)
        else:
            out[(("model_name", model),)] = chisquare_p_value(expected, observed)
    return out


def _mean_confidence(snapshots: list[Snapshot], condition: ConfidenceCondition) -> GroupValues:
    selector = Selector(
        metric=CLASSIFICATION_CONFIDENCE, match={"model_name": condition.model} if condition.model else {}
    )
    total = _increase(snapshots, f"{CLASSIFICATION_CONFIDENCE}_sum", selector, ["model_name"])
    count = _increase(snapshots, f"{CLASSIFICATION_CONFIDENCE}_count", selector, ["model_name"])
    return {g: total.get(g, 0.0) / n for g, n in count.items() if n >= condition.min_samples}
