"""The paired bootstrap interval of a score difference (llmos.evals.bootstrap)."""

from __future__ import annotations

import random

import pytest

from llmos.evals.bootstrap import paired_bootstrap


def test_a_clearly_better_model_has_an_interval_above_zero() -> None:
    rng = random.Random(1)
    baseline = [float(rng.random() < 0.6) for _ in range(400)]
    # The candidate is right wherever the baseline is, and on half of the rest.
    candidate = [1.0 if b == 1.0 or i % 2 == 0 else 0.0 for i, b in enumerate(baseline)]
    mean, low, high = paired_bootstrap(candidate, baseline, iterations=2000, seed=3)
    expected = sum(candidate) / 400 - sum(baseline) / 400
    assert mean == pytest.approx(expected)
    assert 0.0 < low < mean < high


def test_swapping_the_models_mirrors_the_interval() -> None:
    a = [1.0, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 1.0]
    b = [0.0, 0.0, 1.0, 0.0, 0.5, 1.0, 0.0, 1.0]
    mean, low, high = paired_bootstrap(a, b, iterations=500, seed=7)
    back, back_low, back_high = paired_bootstrap(b, a, iterations=500, seed=7)
    assert back == pytest.approx(-mean)
    assert back_low == pytest.approx(-high)
    assert back_high == pytest.approx(-low)


def test_equal_models_have_an_interval_around_zero() -> None:
    rng = random.Random(5)
    a = [float(rng.random() < 0.5) for _ in range(300)]
    b = [x if i % 10 else 1.0 - x for i, x in enumerate(a)]  # disagree on one item in ten, both ways
    _, low, high = paired_bootstrap(a, b, iterations=2000, seed=0)
    assert low < 0.0 < high


def test_the_seed_fixes_the_interval_and_the_confidence_widens_it() -> None:
    a = [float(i % 3 == 0) for i in range(60)]
    b = [float(i % 4 == 0) for i in range(60)]
    assert paired_bootstrap(a, b, iterations=300, seed=11) == paired_bootstrap(a, b, iterations=300, seed=11)
    _, low90, high90 = paired_bootstrap(a, b, iterations=2000, confidence=0.9, seed=2)
    _, low99, high99 = paired_bootstrap(a, b, iterations=2000, confidence=0.99, seed=2)
    assert low99 < low90 and high90 < high99


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "match"),
    [
        ([1.0], [1.0, 0.0], {}, "same length"),
        ([], [], {}, "at least one item"),
        ([1.0], [float("nan")], {}, "finite"),
        ([1.0], [0.0], {"iterations": 0}, "iterations"),
        ([1.0], [0.0], {"confidence": 1.0}, "confidence"),
    ],
)
def test_bad_inputs_are_refused(a: list[float], b: list[float], kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b, **kwargs)  # type: ignore[arg-type]
