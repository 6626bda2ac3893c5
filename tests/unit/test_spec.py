"""Parsing a job's ``method``: an invalid number's error names the field where the request holds it."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from llmos.errors import InvalidRequestError
from llmos.training.spec import parse_spec


def _at(path: str, value: Any) -> dict[str, Any]:
    """A ``method`` with ``value`` at ``path`` (dotted, below ``method``)."""
    method: dict[str, Any] = {"type": "supervised"}
    node = method
    *parents, leaf = path.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return method


# Every numeric field, with a value out of its range, at its place in docs/fine-tuning.md.
FIELDS = [
    ("supervised.hyperparameters.n_epochs", 0),
    ("supervised.hyperparameters.batch_size", 257),
    ("supervised.hyperparameters.learning_rate_multiplier", 0.0),
    ("supervised.adapter.r", 0),
    ("supervised.adapter.alpha", 2000),
    ("supervised.adapter.dropout", 0.95),
    ("supervised.adapter.num_virtual_tokens", 0),
    ("supervised.augmentation.copies", 99),
    ("supervised.max_seq_length", 8),
    ("supervised.gradient_accumulation_steps", 0),
    ("supervised.warmup_ratio", 0.9),
    ("supervised.early_stopping_patience", 0),
]


@pytest.mark.parametrize(("path", "value"), FIELDS)
def test_an_out_of_range_number_names_its_own_field(path: str, value: float) -> None:
    method = _at(path, value)
    if path.startswith("supervised.augmentation."):
        method["supervised"]["augmentation"]["type"] = "eda"
    with pytest.raises(InvalidRequestError) as refused:
        parse_spec(method, None, training_records=10)
    assert refused.value.param == f"method.{path}"
    assert path.rsplit(".", 1)[1] in str(refused.value)


@pytest.mark.parametrize("path", [path for path, _ in FIELDS])
def test_a_value_of_the_wrong_type_names_its_own_field(path: str) -> None:
    method = _at(path, "many")
    if path.startswith("supervised.augmentation."):
        method["supervised"]["augmentation"]["type"] = "eda"
    with pytest.raises(InvalidRequestError) as refused:
        parse_spec(method, None, training_records=10)
    assert refused.value.param == f"method.{path}"


def test_legacy_hyperparameters_are_named_where_they_were_written() -> None:
    with pytest.raises(InvalidRequestError) as refused:
        parse_spec(None, {"n_epochs": 0}, training_records=10)
    assert refused.value.param == "hyperparameters.n_epochs"
    with pytest.raises(InvalidRequestError) as refused:
        parse_spec(None, {"epochs": 2}, training_records=10)
    assert refused.value.param == "hyperparameters.epochs"
    with pytest.raises(InvalidRequestError) as refused:
        parse_spec(_at("supervised.hyperparameters", [1]), None, training_records=10)
    assert refused.value.param == "method.supervised.hyperparameters"
    # method.supervised's own value wins over the legacy one, and so does its error's place.
    spec = parse_spec(_at("supervised.hyperparameters.n_epochs", 2), {"n_epochs": 0}, training_records=10)
    assert spec.n_epochs == 2
    with pytest.raises(InvalidRequestError) as refused:
        parse_spec(_at("supervised.hyperparameters.n_epochs", 0), {"n_epochs": 2}, training_records=10)
    assert refused.value.param == "method.supervised.hyperparameters.n_epochs"


def test_group_by_length_is_a_switch() -> None:
    assert parse_spec(_at("supervised.group_by_length", True), None, training_records=10).group_by_length
    assert not parse_spec(None, None, training_records=10).group_by_length
    with pytest.raises(InvalidRequestError) as err:
        parse_spec(_at("supervised.group_by_length", "yes"), None, training_records=10)
    assert err.value.param == "method.supervised.group_by_length"


def test_validating_a_job_request_imports_no_model_stack() -> None:
    """The CLI's HTTP commands and every module that reads job records validate specs: loading
    transformers (or torch) there costs seconds a command."""
    modules = "llmos.training.spec, llmos.kernel.job_record"
    entry = f"import sys, {modules}; print(sorted({{'torch', 'transformers'}} & set(sys.modules)))"
    shown = subprocess.run([sys.executable, "-c", entry], capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "[]"
