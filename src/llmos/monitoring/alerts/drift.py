"""How far a classifier's label counts moved from a reference, as Evidently measures categorical
drift: the Jensen-Shannon distance of the two shares (base 2, so 0 to 1; a share of 0 taken as
0.0001, as Evidently does) and Pearson's chi-squared test of the current counts against the
reference shares scaled to the current total (its p-value; small means drift)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EMPTY_SHARE = 0.0001
"""Evidently's stand-in for a share of zero, so that a label new in one window stays finite."""


def _shares(counts: Sequence[float]) -> np.ndarray:
    shares = np.asarray(counts, dtype=np.float64) / max(sum(counts), 1e-12)
    shares = np.where(shares == 0, EMPTY_SHARE, shares)
    return shares / shares.sum()


def jensen_shannon_distance(reference: Sequence[float], current: Sequence[float]) -> float:
    """The square root of the mean Kullback-Leibler divergence of each share from their mean."""
    p, q = _shares(reference), _shares(current)
    m = (p + q) / 2
    divergence = (np.sum(p * np.log2(p / m)) + np.sum(q * np.log2(q / m))) / 2
    return float(np.sqrt(max(divergence, 0.0)))


def chisquare_p_value(reference: Sequence[float], current: Sequence[float]) -> float:
    """The p-value of the current counts given the reference's shares (1.0 with a single label)."""
    observed = np.asarray(current, dtype=np.float64)
    expected = _shares(reference) * observed.sum()
    if len(observed) < 2:
        return 1.0
    from scipy.special import chdtrc  # the chi-squared survival function; imported only when used

    statistic = float(((observed - expected) ** 2 / expected).sum())
    return float(chdtrc(len(observed) - 1, statistic))
