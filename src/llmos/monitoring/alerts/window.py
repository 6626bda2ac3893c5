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
SeriesKey = tuple[str, Labels]
"""A sample's name (``llmos_request_errors_total``, ``..._bucket``) and its labels."""


@dataclass(frozen=True)
class Snapshot:
    at: float
    values: dict[SeriesKey, float]


class MetricWindow:
    """Snapshots of the named metric families, oldest dropped once older than ``span_s``."""

    def __init__(self, span_s: float, collect: Callable[[], Iterable[Metric]] = REGISTRY.collect) -> None:
        self.span_s = span_s
        self._collect = collect
        self._snapshots: deque[Snapshot] = deque()
        self._lock = threading.Lock()

    def sample(self, now: float, families: set[str]) -> None:
        """Copy the current values of ``families`` (family names, as the registry names them)."""
        values: dict[SeriesKey, float] = {}
        for family in self._collect():
            if family.name not in families:
                continue
            for s in family.samples:
                values[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
        with self._lock:
            self._snapshots.append(Snapshot(now, values))
            while self._snapshots and self._snapshots[0].at < now - self.span_s:
                self._snapshots.popleft()

    def between(self, start: float, end: float) -> list[Snapshot]:
        """Snapshots taken at ``start <= at <= end``, oldest first."""
        with self._lock:
            return [s for s in self._snapshots if start <= s.at <= end]

    def __len__(self) -> int:
        return len(self._snapshots)
