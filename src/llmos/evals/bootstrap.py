"""The paired bootstrap: how sure we are that one model scores better than another on the same items.

Both models are scored on the same items, so what varies between them is the per-item
difference; resampling items (not each model's scores apart) keeps each item's pair together,
which is what makes the interval narrow enough to decide on when the models agree on most items.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DEFAULT_ITERATIONS = 10_000
DEFAULT_CONFIDENCE = 0.95


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    iterations: int = DEFAULT_ITERATIONS,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The mean of ``a[i] - b[i]`` over the items and its percentile bootstrap interval.

    ``a`` and ``b`` are two models' scores on the same items, in the same order (``a`` the
    candidate, ``b`` the baseline: a positive difference means ``a`` scores higher). Returns
    ``(mean_diff, low, high)``; the interval excludes zero when ``low > 0`` or ``high < 0``.
    Raises ValueError for unequal or empty inputs, a non-finite score, fewer than 1 iteration or a
    confidence outside (0, 1). The same ``seed`` gives the same interval.
    """
    if len(a) != len(b):
        raise ValueError(f"paired scores must have the same length; got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("paired bootstrap needs at least one item")
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    if not 0.0 < confidence < 1.0:
        raise ValueError("confidence must be between 0 and 1")
    diffs = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if not np.all(np.isfinite(diffs)):
        raise ValueError("scores must be finite numbers")
    rng = np.random.default_rng(seed)
    n = len(diffs)
    means = np.empty(iterations, dtype=np.float64)
    # Resampled in blocks so that a large run never holds iterations x items indices at once.
    block = max(1, 4_000_000 // n)
    for start in range(0, iterations, block):
        stop = min(iterations, start + block)
        means[start:stop] = diffs[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(diffs.mean()), float(low), float(high)
