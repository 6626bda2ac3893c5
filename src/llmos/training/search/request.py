"""A search request checked before anything is created: the trials' job (as for
``/v1/fine_tuning/jobs``), the search space (every point a valid job), the sampler, the pruner,
the budget. Every problem is a 400 naming its ``param``."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from llmos.errors import InvalidRequestError
from llmos.kernel.job_requests import check_job_request
from llmos.registry.files import FileStore
from llmos.registry.metadata import check_metadata
from llmos.registry.service import ModelRegistry
from llmos.training.classify import ClassificationTask
from llmos.training.dpo import DPOTask
from llmos.training.loop import Selection
from llmos.training.ner import TokenClassificationTask
from llmos.training.preflight import check_job_body
from llmos.training.search.space import SearchSpace, apply_point, knob_of, parse_space
from llmos.training.sft import ChatTask
from llmos.training.spec import parse_spec

FIELDS = frozenset(
    {
        "model",
        "training_file",
        "validation_file",
        "method",
        "hyperparameters",
        "suffix",
        "seed",
        "priority",
        "metadata",
        "search_space",
        "sampler",
        "pruner",
        "budget",
        "parallelism",
    }
)
TEMPLATE_FIELDS = ("model", "training_file", "validation_file", "method", "hyperparameters", "suffix", "priority")
"""What every trial's job takes from the request as it is."""
SELECTIONS: dict[str, Selection] = {
    "chat": ChatTask.selection,
    "dpo": DPOTask.selection,
    "sequence-classification": ClassificationTask.selection,
    "token-classification": TokenClassificationTask.selection,
}
"""A job's task -> the validation metric it ranks its epochs by: the search's objective, so a
trial's value is the score of the very model its job registers."""
MAX_TRIALS = 200
MAX_WALL_SECONDS = 7 * 24 * 3600
MAX_PARALLELISM = 16
DEFAULT_TRIALS = 10
PREFLIGHT_COMBINATIONS = 32
"""Distinct categorical combinations checked against the base model (each builds it on the meta device)."""
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "successive_halving", "none")


@dataclass(frozen=True)
class SearchRequest:
    """What a search row stores (``as_json``) and its runner reads back (``from_json``)."""

    template: dict[str, Any]
    """Every trial's job body before its point is placed (seed included: trials differ only by their point)."""
    space: dict[str, Any]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    metric: str
    direction: str
    max_trials: int
    max_wall_seconds: int | None
    parallelism: int
    task: str

    def as_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SearchRequest:
        return cls(**data)

    @property
    def search_space(self) -> SearchSpace:
        return parse_space(self.space)


def check_search_request(
    registry: ModelRegistry, files: FileStore, tenant: str, body: dict[str, Any]
) -> tuple[SearchRequest, dict[str, str] | None]:
    """The checked request and the search's own metadata; nothing is created here."""
    space = parse_space(body.get("search_space"))
    if not body.get("validation_file"):
        raise InvalidRequestError(
            "a search needs a validation_file: its trials are compared on validation metrics",
            param="validation_file",
        )
    template = {k: body[k] for k in TEMPLATE_FIELDS if k in body}
    template["seed"] = body["seed"] if body.get("seed") is not None else secrets.randbelow(2**31)
    first = check_job_request(registry, files, tenant, template)  # the fixed part, before points are placed in it
    records = int(first.training.summary.get("records", 0))
    checked: set[tuple[Any, ...]] = set()
    for corner in space.corners():
        point_body = apply_point(template, corner)
        with _point_errors(corner, space):
            parse_spec(point_body.get("method"), point_body.get("hyperparameters"), training_records=records)
            categorical = tuple(v for v in corner.values() if isinstance(v, str))
            if categorical not in checked and len(checked) < PREFLIGHT_COMBINATIONS:
                checked.add(categorical)
                check_job_body(registry, files, tenant, point_body)
    sampler = _sampler(body.get("sampler"), space)
    grid_size = _grid_size(space) if sampler["type"] == "grid" else None
    max_trials, max_wall_seconds = _budget(body.get("budget"), grid_size)
    selection = SELECTIONS.get(first.task)
    if selection is None:
        raise InvalidRequestError(
            f"a search runs {', '.join(SELECTIONS)} jobs, not {first.task}", param="method", code="unsupported_method"
        )
    request = SearchRequest(
        template=template,
        space=body["search_space"],
        sampler=sampler,
        pruner=_pruner(body.get("pruner")),
        metric=selection.metric,
        direction="maximize" if selection.higher_is_better else "minimize",
        max_trials=max_trials,
        max_wall_seconds=max_wall_seconds,
        parallelism=_integer(body.get("parallelism"), "parallelism", 1, MAX_PARALLELISM, 1),
        task=first.task,
    )
    return request, check_metadata(body.get("metadata"))


@contextmanager
def _point_errors(point: dict[str, Any], space: SearchSpace) -> Iterator[None]:
    """A job error a searched parameter caused, as the search space's error naming that parameter
    (an error of the fixed part of the job keeps its own ``param``)."""
    try:
        yield
    except InvalidRequestError as exc:
        name = knob_of(exc.param, space.distributions)
        if name is None:
            raise
        raise InvalidRequestError(
            f"search_space: the point {point} makes an invalid job: {exc.message}",
            param=f"search_space.{name}",
            code=exc.code,
        ) from exc


def _grid_size(space: SearchSpace) -> int:
    size = 1
    for values in space.grid("search_space").values():
        size *= len(values)
    return size


def _options(value: Any, param: str, kinds: tuple[str, ...], fields: dict[str, set[str]]) -> dict[str, Any]:
    """``{"type": one of kinds, ...}`` with only that type's fields; absent: the first kind."""
    if value is None:
        return {"type": kinds[0]}
    if not isinstance(value, dict) or value.get("type", kinds[0]) not in kinds:
        raise InvalidRequestError(f"{param}.type must be one of {list(kinds)}", param=f"{param}.type")
    kind = value.get("type", kinds[0])
    unknown = sorted(set(value) - fields[kind] - {"type"})
    if unknown:
        raise InvalidRequestError(f"unknown field '{unknown[0]}' for the {kind} {param}", param=f"{param}.{unknown[0]}")
    return {**value, "type": kind}


def _sampler(value: Any, space: SearchSpace) -> dict[str, Any]:
    options = _options(value, "sampler", SAMPLERS, {"tpe": {"n_startup_trials"}, "random": set(), "grid": set()})
    if options["type"] == "tpe":
        options["n_startup_trials"] = _integer(
            options.get("n_startup_trials"), "sampler.n_startup_trials", 0, MAX_TRIALS, 10
        )
    if options["type"] == "grid":
        space.grid("search_space")  # only finite spaces have a grid
    return options


def _pruner(value: Any) -> dict[str, Any]:
    fields = {
        "median": {"n_startup_trials", "n_warmup_steps"},
        "successive_halving": {"min_resource", "reduction_factor", "min_early_stopping_rate"},
        "none": set(),
    }
    options = _options(value, "pruner", PRUNERS, fields)
    if options["type"] == "median":
        options["n_startup_trials"] = _integer(options.get("n_startup_trials"), "pruner.n_startup_trials", 0, 200, 5)
        options["n_warmup_steps"] = _integer(options.get("n_warmup_steps"), "pruner.n_warmup_steps", 0, 1000, 0)
    if options["type"] == "successive_halving":
        options["min_resource"] = _integer(options.get("min_resource"), "pruner.min_resource", 1, 1000, 1)
        options["reduction_factor"] = _integer(options.get("reduction_factor"), "pruner.reduction_factor", 2, 100, 4)
        options["min_early_stopping_rate"] = _integer(
            options.get("min_early_stopping_rate"), "pruner.min_early_stopping_rate", 0, 100, 0
        )
    return options


def _budget(value: Any, grid_size: int | None) -> tuple[int, int | None]:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise InvalidRequestError("budget must be an object", param="budget")
    unknown = sorted(set(value) - {"max_trials", "max_wall_seconds"})
    if unknown:
        raise InvalidRequestError(f"unknown field '{unknown[0]}' in budget", param=f"budget.{unknown[0]}")
    default = min(grid_size, MAX_TRIALS) if grid_size is not None else DEFAULT_TRIALS
    if grid_size is not None and isinstance(value.get("max_trials"), int) and value["max_trials"] > grid_size:
        raise InvalidRequestError(f"budget.max_trials exceeds the grid's {grid_size} points", param="budget.max_trials")
    trials = _integer(value.get("max_trials"), "budget.max_trials", 1, MAX_TRIALS, default)
    seconds = value.get("max_wall_seconds")
    wall = None if seconds is None else _integer(seconds, "budget.max_wall_seconds", 1, MAX_WALL_SECONDS, 0)
    return trials, wall


def _integer(value: Any, param: str, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(f"{param} must be an integer from {low} to {high}", param=param)
    return value
