"""The recent past of the metrics the rules read: snapshots of prometheus_client's registry taken
at each evaluation, kept in memory for as long as the longest rule looks back, no longer.

Only the metrics some rule names are copied, so the memory is (series of those metrics) x
(span / interval) floats at most.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

Labels = tuple[tuple[str, str], ...]
"""A series' labels, sorted by name (hashable)."""


@dataclass(frozen=True)
class Snapshot:
    at: float
    values: dict[str, dict[Labels, float]]
    """By sample name (``llmos_request_errors_total``, ``..._bucket``), each series' value."""

    def series(self, name: str) -> dict[Labels, float]:
        return self.values.get(name, {})


_MONOTONIC = frozenset({"counter", "histogram", "summary"})


class MetricWindow:
    """Snapshots of the named metric families, oldest dropped once older than ``span_s``."""

    def __init__(self, span_s: float, collect: Callable[[], Iterable[Metric]] = REGISTRY.collect) -> None:
        self.span_s = span_s
        self._collect = collect
        self._snapshots: deque[Snapshot] = deque()
        self._lock = threading.Lock()
        self._last_raw: dict[tuple[str, Labels], float] = {}
        self._reset_offset: dict[tuple[str, Labels], float] = {}

    def sample(self, now: float, families: set[str]) -> None:
        """Copy the current values of ``families`` (family names, as the registry names them).

        Counters (and histograms' buckets, sums and counts) are kept reset-adjusted: a value
        lower than the last one means the counter restarted from 0, and the last value is added
        to it from then on, so a counter's growth between any two snapshots is their difference."""
        values: dict[str, dict[Labels, float]] = {}
        for family in self._collect():
            if family.name not in families:
                continue
            monotonic = family.type in _MONOTONIC
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                labels = tuple(sorted(s.labels.items()))
                value = float(s.value)
                if monotonic:
                    value = self._adjusted((s.name, labels), value)
                values.setdefault(s.name, {})[labels] = value
        with self._lock:
            self._snapshots.append(Snapshot(now, values))
            while self._snapshots and self._snapshots[0].at < now - self.span_s:
                self._snapshots.popleft()

    def _adjusted(self, key: tuple[str, Labels], raw: float) -> float:
        last = self._last_raw.get(key)
        if last is not None and raw < last:
            self._reset_offset[key] = self._reset_offset.get(key, 0.0) + last
        self._last_raw[key] = raw
        return raw + self._reset_offset.get(key, 0.0)

    def between(self, start: float, end: float) -> list[Snapshot]:
        """Snapshots taken at ``start <= at <= end``, oldest first."""
        with self._lock:
            return [s for s in self._snapshots if start <= s.at <= end]

    def __len__(self) -> int:
        return len(self._snapshots)
