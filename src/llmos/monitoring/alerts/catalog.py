"""Which metrics a rule may name: the families in prometheus_client's registry and their types,
so a rule naming a metric that does not exist, or a gauge where a counter belongs, is refused
when it is written rather than silently never firing."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

from llmos.errors import InvalidRequestError
from llmos.monitoring import metrics as _metrics  # noqa: F401  (registers every platform metric)
from llmos.monitoring.alerts.rules import (
    AverageCondition,
    ConfidenceCondition,
    IncreaseCondition,
    LabelDriftCondition,
    QuantileCondition,
    RateCondition,
    RatioCondition,
    Rule,
)

CLASSIFICATION_LABELS = "llmos_classification_labels"
"""The counter of labels classification models returned (``model_name``, ``label``)."""
CLASSIFICATION_CONFIDENCE = "llmos_classification_confidence"
"""The histogram of the top score of each classification (``model_name``)."""

_ALLOWED = {
    RateCondition: ("counter",),
    IncreaseCondition: ("counter", "gauge"),
    AverageCondition: ("gauge",),
    QuantileCondition: ("histogram",),
}


class MetricCatalog:
    """Metric families by name, read from the registry each time a rule is checked."""

    def __init__(self, collect: Callable[[], Iterable[Metric]] = REGISTRY.collect) -> None:
        self._collect = collect
        self._types: dict[str, str] = {}

    def refresh(self) -> None:
        self._types = {family.name: family.type for family in self._collect()}

    def family(self, metric: str) -> str | None:
        """The registry's family name of ``metric`` (a counter may be named with its ``_total``)."""
        if metric in self._types:
            return metric
        base = metric.removesuffix("_total")
        return base if self._types.get(base) == "counter" else None

    def kind(self, metric: str) -> str | None:
        family = self.family(metric)
        return self._types[family] if family else None

    def sample_name(self, metric: str) -> str:
        family = self.family(metric) or metric
        return f"{family}_total" if self._types.get(family) == "counter" else family

    def families_of(self, rule: Rule) -> set[str]:
        """The families a rule reads, to be copied into the window."""
        condition = rule.condition
        if isinstance(condition, LabelDriftCondition):
            return {CLASSIFICATION_LABELS}
        if isinstance(condition, ConfidenceCondition):
            return {CLASSIFICATION_CONFIDENCE}
        selectors = (
            [condition.numerator, condition.denominator] if isinstance(condition, RatioCondition) else [condition]
        )
        return {self.family(s.metric) or s.metric for s in selectors}

    def check(self, rule: Rule, *, interval_s: float, max_window_s: float) -> None:
        """400 naming the field when a rule reads a metric that does not exist or has the wrong type,
        or looks back less than one evaluation interval or beyond what the window keeps."""
        self.refresh()
        condition = rule.condition
        span = condition.window + getattr(condition, "reference_window", 0.0)
        if condition.window < interval_s:
            raise InvalidRequestError(
                f"window {condition.window:g}s is shorter than the evaluation interval ({interval_s:g}s)",
                param="condition.window",
            )
        if span > max_window_s:
            raise InvalidRequestError(
                f"the rule looks back {span:g}s; at most {max_window_s:g}s (alert_max_window_s) is kept",
                param="condition.window",
            )
        if isinstance(condition, RatioCondition):
            self._check_metric(condition.numerator.metric, ("counter",), "condition.numerator.metric")
            self._check_metric(condition.denominator.metric, ("counter",), "condition.denominator.metric")
        elif type(condition) in _ALLOWED:
            self._check_metric(condition.metric, _ALLOWED[type(condition)], "condition.metric")  # type: ignore[union-attr]

    def _check_metric(self, metric: str, kinds: tuple[str, ...], param: str) -> None:
        kind = self.kind(metric)
        if kind is None:
            raise InvalidRequestError(f"unknown metric {metric!r}", param=param, code="unknown_metric")
        if kind not in kinds:
            raise InvalidRequestError(f"{metric} is a {kind}; this condition reads a {' or '.join(kinds)}", param=param)
