"""Alert rules: their schema, read from YAML or an API body, and checked before they are kept.

A rule is Prometheus-rule-like: a condition over the platform's own metrics gives a value per
label group, compared with a threshold; held for ``for`` it fires. Conditions are a closed set
(no expression language to parse): a counter's rate or increase, a ratio of two rates, a
quantile of a histogram, a gauge's average over a window, and two model-output conditions over
a classifier's labels (their shares against a reference window, their mean confidence).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from llmos.errors import InvalidRequestError
from llmos.monitoring.alerts.template import check_template

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_LABEL_NAME = r"^[a-zA-Z_][a-zA-Z0-9_]{0,62}$"
RULE_NAME = r"^[a-zA-Z_][a-zA-Z0-9_.:-]{0,127}$"
LabelName = Annotated[str, Field(pattern=_LABEL_NAME)]
LabelValue = Annotated[str, Field(max_length=256)]


def parse_duration(value: Any) -> float:
    """Seconds from ``30s``, ``5m``, ``1h`` (Prometheus' units) or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string such as '30s', '5m', '1h'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value.strip())):
        seconds = float(match[1]) * _UNIT_SECONDS[match[2]]
    else:
        raise ValueError("a duration is a number of seconds or a string such as '30s', '5m', '1h'")
    if not 0 <= seconds < 366 * 86400:
        raise ValueError("a duration must be between 0 and a year")
    return seconds


Duration = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Selector(_Strict):
    """A metric and the series of it to add up: labels equal to ``match``, matching ``match_re``."""

    metric: Annotated[str, Field(pattern=r"^[a-zA-Z_:][a-zA-Z0-9_:]{0,199}$")]
    match: dict[LabelName, LabelValue] = Field(default_factory=dict, max_length=16)
    match_re: dict[LabelName, Annotated[str, Field(max_length=256)]] = Field(default_factory=dict, max_length=16)
    """Regular expressions the whole label value must match (Prometheus' ``=~``)."""

    @field_validator("match_re")
    @classmethod
    def _compiles(cls, value: dict[str, str]) -> dict[str, str]:
        for label, pattern in value.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"match_re.{label} is not a regular expression: {exc}") from None
        return value


class _Windowed(_Strict):
    window: Duration
    """How far back the condition looks, in seconds or as '5m'."""

    @field_validator("window", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        if (seconds := parse_duration(value)) <= 0:
            raise ValueError("a window must be longer than 0 s")
        return seconds


class RateCondition(_Windowed, Selector):
    """Per-second rate of a counter over the window (``rate(metric[window])``)."""

    kind: Literal["rate"]


class IncreaseCondition(_Windowed, Selector):
    """How much a counter grew over the window, or a gauge changed (``increase``/``delta``)."""

    kind: Literal["increase"]


class AverageCondition(_Windowed, Selector):
    """A gauge's average over the window (``avg_over_time``)."""

    kind: Literal["average"]


class QuantileCondition(_Windowed, Selector):
    """A quantile of a histogram's observations in the window (``histogram_quantile``)."""

    kind: Literal["quantile"]
    quantile: Annotated[float, Field(gt=0, lt=1)]


class RatioCondition(_Windowed):
    """The rate of one counter over the rate of another (an error rate); 0/0 gives no value."""

    kind: Literal["ratio"]
    numerator: Selector
    denominator: Selector


class LabelDriftCondition(_Windowed):
    """The shares of the labels a classification model returned in the window against those of
    the reference window just before it: the Jensen-Shannon distance (base 2, 0 to 1; Evidently
    calls 0.1 drift) or the chi-squared test's p-value (drift below 0.05)."""

    kind: Literal["label_drift"]
    method: Literal["jensenshannon", "chisquare"] = "jensenshannon"
    reference_window: Duration
    model: Annotated[str, Field(max_length=512)] | None = None
    """One model's outputs only (its ``model_name``); by default every classification model apart."""
    min_samples: Annotated[int, Field(ge=1, le=10**9)] = 30
    """Fewer classifications than this in either window give no value (the test means little)."""

    @field_validator("reference_window", mode="before")
    @classmethod
    def _reference(cls, value: Any) -> float:
        return parse_duration(value)


class ConfidenceCondition(_Windowed):
    """The mean confidence (top score) of a classification model's outputs in the window."""

    kind: Literal["mean_confidence"]
    model: Annotated[str, Field(max_length=512)] | None = None
    min_samples: Annotated[int, Field(ge=1, le=10**9)] = 30


Condition = Annotated[
    RateCondition
    | IncreaseCondition
    | AverageCondition
    | QuantileCondition
    | RatioCondition
    | LabelDriftCondition
    | ConfidenceCondition,
    Field(discriminator="kind"),
]
Operator = Literal[">", ">=", "<", "<=", "==", "!=", "outside"]
Threshold = float | tuple[float, float]


class Rule(_Strict):
    """One alert rule as written in YAML or sent to ``/v1/admin/alerts/rules``."""

    name: Annotated[str, Field(pattern=RULE_NAME)]
    condition: Condition
    op: Operator = ">"
    threshold: Threshold
    """A number, or ``[low, high]`` with ``op: outside`` (a band the value must stay in)."""
    for_: Duration = Field(default=0.0, alias="for")
    """How long the condition must hold before the alert fires (pending until then)."""
    by: list[LabelName] = Field(default_factory=list, max_length=8)
    """Labels whose values split the series into groups, each its own alert (``sum by``)."""
    severity: Literal["info", "warning", "critical"] = "warning"
    labels: dict[LabelName, LabelValue] = Field(default_factory=dict, max_length=32)
    annotations: dict[LabelName, Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict, max_length=32)
    enabled: bool = True

    @field_validator("for_", mode="before")
    @classmethod
    def _for(cls, value: Any) -> float:
        return parse_duration(value)

    @field_validator("annotations", "labels")
    @classmethod
    def _templates(cls, value: dict[str, str]) -> dict[str, str]:
        for key, text in value.items():
            try:
                check_template(text)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return value

    @field_validator("threshold")
    @classmethod
    def _threshold_fits_op(
        cls, value: float | tuple[float, float], info: ValidationInfo
    ) -> float | tuple[float, float]:
        band = isinstance(value, tuple)
        if (info.data.get("op") == "outside") != band:
            raise ValueError("op 'outside' takes threshold [low, high]; every other op takes one number")
        if isinstance(value, tuple) and value[0] > value[1]:
            raise ValueError("threshold [low, high] needs low <= high")
        return value

    @field_validator("by")
    @classmethod
    def _by_fits_condition(cls, value: list[str], info: ValidationInfo) -> list[str]:
        if value and isinstance(info.data.get("condition"), LabelDriftCondition | ConfidenceCondition):
            raise ValueError("model-output conditions are grouped by model_name already; leave 'by' out")
        return value

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def compare(op: Operator, value: float, threshold: float | tuple[float, float]) -> bool:
    if isinstance(threshold, tuple):
        return not threshold[0] <= value <= threshold[1]
    return {
        ">": value > threshold,
        ">=": value >= threshold,
        "<": value < threshold,
        "<=": value <= threshold,
        "==": value == threshold,
        "!=": value != threshold,
    }[op]


def parse_rule(data: Any, *, where: str = "") -> Rule:
    """A rule from plain data, or 400 naming the field (``where`` prefixes it, e.g. a file's index)."""
    try:
        return Rule.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in _field_path(first["loc"]))
        param = f"{where}{field}" if field else where.rstrip(".") or None
        raise InvalidRequestError(f"invalid alert rule: {param or 'rule'}: {first['msg']}", param=param) from None


_CONDITION_KINDS = {"rate", "increase", "average", "quantile", "ratio", "label_drift", "mean_confidence"}


def _field_path(loc: tuple[int | str, ...]) -> list[int | str]:
    """Pydantic's error location without the union member it tried (``condition.rate.window``,
    ``threshold.float``): the field as the rule's author wrote it."""
    path: list[int | str] = []
    for i, part in enumerate(loc):
        if i == 1 and path == ["condition"] and part in _CONDITION_KINDS:
            continue
        if path == ["threshold"]:
            break
        path.append(part)
    return path


def load_rules_file(path: Path) -> list[Rule]:
    """Rules from a YAML file: a list of rules, or ``{"rules": [...]}`` as Prometheus groups them.
    Read with the safe loader (plain data only, never Python objects)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRequestError(f"cannot read alert rules from {path}: {exc}", param="alert_rules_file") from None
    if isinstance(data, dict) and "rules" in data:
        data = data["rules"]
    if data is None:
        return []
    if not isinstance(data, list):
        raise InvalidRequestError(f"{path}: expected a list of rules", param="alert_rules_file")
    rules = [parse_rule(item, where=f"{path.name}[{i}].") for i, item in enumerate(data)]
    names = [r.name for r in rules]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise InvalidRequestError(f"{path}: rule names repeat: {', '.join(dupes)}", param="alert_rules_file")
    return rules
