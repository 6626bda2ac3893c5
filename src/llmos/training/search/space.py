"""A search space: which settings of a fine-tuning job a search varies, over which values, and
the job body each sampled point makes. Every point of the space must make a valid job: the
corners of the space are checked with the job parser itself before anything is created."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from llmos.errors import InvalidRequestError
from llmos.training.spec import BASE_LR

MAX_CHOICES = 64
MAX_CORNERS = 4096
"""Corners checked together; a larger space has each parameter's corners checked on its own."""
Value = str | int | float | bool


@dataclass(frozen=True)
class Knob:
    """A searchable setting: where its value goes in ``method.<type>``, and what kind it is."""

    path: tuple[str, ...]
    kind: type
    convert: Callable[[Any, dict[str, Any]], Any] | None = None
    """From the searched value to the job's (given the trial's method section), e.g. an absolute
    learning rate to the multiplier of the trial's adapter."""


def _multiplier(learning_rate: float, section: dict[str, Any]) -> float:
    adapter = (section.get("adapter") or {}).get("type", "lora")
    return learning_rate / BASE_LR.get(adapter, BASE_LR["lora"])


KNOBS: dict[str, Knob] = {
    "learning_rate": Knob(("hyperparameters", "learning_rate_multiplier"), float, _multiplier),
    "learning_rate_multiplier": Knob(("hyperparameters", "learning_rate_multiplier"), float),
    "n_epochs": Knob(("hyperparameters", "n_epochs"), int),
    "batch_size": Knob(("hyperparameters", "batch_size"), int),
    "beta": Knob(("hyperparameters", "beta"), float),
    "adapter": Knob(("adapter", "type"), str),
    "lora_r": Knob(("adapter", "r"), int),
    "lora_alpha": Knob(("adapter", "alpha"), int),
    "lora_dropout": Knob(("adapter", "dropout"), float),
    "num_virtual_tokens": Knob(("adapter", "num_virtual_tokens"), int),
    "warmup_ratio": Knob(("warmup_ratio",), float),
    "weight_decay": Knob(("weight_decay",), float),
    "lr_scheduler": Knob(("lr_scheduler",), str),
    "gradient_accumulation_steps": Knob(("gradient_accumulation_steps",), int),
    "max_seq_length": Knob(("max_seq_length",), int),
}
"""Every setting a search may vary, by the name the search space and its results use."""


@dataclass(frozen=True)
class SearchSpace:
    distributions: dict[str, BaseDistribution]

    def grid(self, param: str) -> dict[str, list[Value]]:
        """Every value of each parameter, for the grid sampler (only finite spaces have one)."""
        values: dict[str, list[Value]] = {}
        for name, dist in self.distributions.items():
            if isinstance(dist, CategoricalDistribution):
                values[name] = list(dist.choices)  # type: ignore[arg-type]
            elif isinstance(dist, IntDistribution) and not dist.log:
                values[name] = list(range(dist.low, dist.high + 1, dist.step))
            else:
                raise InvalidRequestError(
                    f"the grid sampler needs a finite set of values: give {name} as categorical choices or an "
                    "int range without log",
                    param=f"{param}.{name}",
                )
        return values

    def corners(self) -> Iterator[dict[str, Value]]:
        """The points the whole space's validity follows from: every choice of each categorical
        parameter and both ends of each range (a job's own checks are ranges and choices)."""
        ends = {name: _ends(dist) for name, dist in self.distributions.items()}
        if math.prod(len(v) for v in ends.values()) <= MAX_CORNERS:
            for combo in itertools.product(*ends.values()):
                yield dict(zip(ends, combo, strict=True))
            return
        first = {name: values[0] for name, values in ends.items()}
        for name, values in ends.items():
            for value in values:
                yield {**first, name: value}


def _ends(dist: BaseDistribution) -> list[Value]:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)  # type: ignore[arg-type]
    assert isinstance(dist, IntDistribution | FloatDistribution)
    return [dist.low, dist.high]


def parse_space(value: Any, param: str = "search_space") -> SearchSpace:
    """The request's ``search_space``: ``{name: {"type": "categorical", "choices": [...]} |
    {"type": "int", "low", "high", "step"?, "log"?} | {"type": "float", "low", "high", "log"?}}``."""
    if not isinstance(value, dict) or not value:
        raise InvalidRequestError(f"{param} must be an object naming at least one parameter", param=param)
    if "learning_rate" in value and "learning_rate_multiplier" in value:
        raise InvalidRequestError(
            "search learning_rate or learning_rate_multiplier, not both", param=f"{param}.learning_rate"
        )
    distributions: dict[str, BaseDistribution] = {}
    for name, spec in value.items():
        where = f"{param}.{name}"
        knob = KNOBS.get(name)
        if knob is None:
            raise InvalidRequestError(
                f"unknown search parameter '{str(name)[:64]}'; searchable: {sorted(KNOBS)}", param=where
            )
        distributions[name] = _distribution(spec, knob, where)
    return SearchSpace(distributions)


def _distribution(spec: Any, knob: Knob, where: str) -> BaseDistribution:
    if not isinstance(spec, dict):
        raise InvalidRequestError(f"{where} must be an object with a type", param=where)
    kind = spec.get("type")
    allowed = {"categorical": {"choices"}, "int": {"low", "high", "step", "log"}, "float": {"low", "high", "log"}}
    if not isinstance(kind, str) or kind not in allowed or (kind != "categorical" and knob.kind is str):
        types = ["categorical"] if knob.kind is str else sorted(allowed)
        raise InvalidRequestError(f"{where}.type must be one of {types}", param=f"{where}.type")
    unknown = sorted(set(spec) - allowed[kind] - {"type"})
    if unknown:
        raise InvalidRequestError(f"unknown field '{unknown[0]}' in {where}", param=f"{where}.{unknown[0]}")
    if kind == "categorical":
        return CategoricalDistribution(_choices(spec.get("choices"), knob, f"{where}.choices"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise InvalidRequestError("log must be true or false", param=f"{where}.log")
    number = int if kind == "int" else float
    if kind == "float" and knob.kind is int:
        raise InvalidRequestError(f"{where} takes whole numbers: use type int", param=f"{where}.type")
    low, high = (_bound(spec.get(end), number, f"{where}.{end}") for end in ("low", "high"))
    if low > high:
        raise InvalidRequestError(f"{where}.low must not exceed high", param=f"{where}.low")
    if log and low <= 0:
        raise InvalidRequestError(f"{where}.low must be above 0 on a log scale", param=f"{where}.low")
    if kind == "float":
        return FloatDistribution(float(low), float(high), log=log)
    step = int(_bound(spec.get("step", 1), int, f"{where}.step"))
    if step < 1 or (log and step != 1):
        raise InvalidRequestError(f"{where}.step must be a positive integer (1 on a log scale)", param=f"{where}.step")
    return IntDistribution(int(low), int(high), log=log, step=step)


def _bound(value: Any, number: type, where: str) -> int | float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (number is int and not isinstance(value, int)):
        raise InvalidRequestError(f"{where} must be {'an integer' if number is int else 'a number'}", param=where)
    return value


def _choices(value: Any, knob: Knob, where: str) -> tuple[Value, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_CHOICES:
        raise InvalidRequestError(f"{where} must be a list of 1 to {MAX_CHOICES} values", param=where)
    for choice in value:
        wanted: tuple[type, ...] = (str,) if knob.kind is str else (int,) if knob.kind is int else (int, float)
        if isinstance(choice, bool) or not isinstance(choice, wanted):
            raise InvalidRequestError(f"{where} holds {choice!r}, not a {knob.kind.__name__}", param=where)
    if len(set(value)) != len(value):
        raise InvalidRequestError(f"{where} repeats a value", param=where)
    return tuple(value)


def apply_point(template: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The job body of one point: ``template`` (a job body) with each parameter's value placed
    under ``method.<type>``; derived values (an absolute learning rate) once the rest is placed."""
    body = copy.deepcopy(template)
    method = body.setdefault("method", {"type": "supervised"})
    section = method.setdefault(method.get("type", "supervised"), {})
    for name, value in sorted(point.items(), key=lambda item: KNOBS[item[0]].convert is not None):
        knob = KNOBS[name]
        *parents, leaf = knob.path
        target = section
        for key in parents:
            target = target.setdefault(key, {})
        target[leaf] = knob.convert(value, section) if knob.convert else value
    return body


def knob_of(job_param: str | None, searched: Iterable[str]) -> str | None:
    """The searched parameter a job body's field (an error's ``param``) comes from, if any."""
    for name in searched:
        if job_param and job_param.endswith(".".join(KNOBS[name].path)):
            return name
    return None
