"""What each condition computes, from real prometheus_client metrics in a registry of the test's
own, sampled at times the test chooses."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

from llmos.monitoring.alerts.catalog import MetricCatalog
from llmos.monitoring.alerts.functions import evaluate
from llmos.monitoring.alerts.rules import parse_rule
from llmos.monitoring.alerts.window import MetricWindow


class Scene:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("t_requests", "", ["model_name", "status"], registry=self.registry)
        self.waiting = Gauge("t_waiting", "", ["model_name"], registry=self.registry)
        self.latency = Histogram(
            "t_latency_seconds", "", ["model_name"], buckets=(0.1, 0.5, 1.0), registry=self.registry
        )
        self.catalog = MetricCatalog(self.registry.collect)
        self.catalog.refresh()
        self.window = MetricWindow(3600, self.registry.collect)

    def sample(self, at: float) -> None:
        self.window.sample(at, {"t_requests", "t_waiting", "t_latency_seconds"})

    def value(self, condition: dict[str, Any], by: list[str], now: float) -> dict[tuple[tuple[str, str], ...], float]:
        rule = parse_rule({"name": "r", "condition": condition, "threshold": 0, "by": by})
        return evaluate(rule.condition, rule.by, self.window, self.catalog, now)


@pytest.fixture
def scene() -> Scene:
    s = Scene()
    s.requests.labels("a", "200").inc(0)
    s.sample(0)
    s.requests.labels("a", "200").inc(90)
    s.requests.labels("a", "500").inc(10)  # a series born inside the window counts from 0
    s.requests.labels("b", "200").inc(40)
    s.waiting.labels("a").set(4)
    s.sample(10)
    s.waiting.labels("a").set(8)
    for seconds in (0.05,) * 50 + (0.3,) * 40 + (0.8,) * 10:
        s.latency.labels("a").observe(seconds)
    s.sample(20)
    return s


def test_rate_and_increase_per_group(scene: Scene) -> None:
    window = {"metric": "t_requests_total", "window": 20}
    assert scene.value({"kind": "rate", **window}, [], 20) == {(): pytest.approx(140 / 20)}
    assert scene.value({"kind": "increase", **window}, ["model_name"], 20) == {
        (("model_name", "a"),): 100,
        (("model_name", "b"),): 40,
    }
    matched = scene.value({"kind": "increase", **window, "match_re": {"status": "5.."}}, [], 20)
    assert matched == {(): 10}
    assert scene.value({"kind": "increase", "metric": "t_waiting", "window": 20}, [], 20) == {(): 4}  # a gauge: delta


def test_a_counter_reset_counts_from_zero() -> None:
    values = iter([5.0, 9.0, 3.0, 4.0])  # the process restarted between 9 and 3

    class Restarting:
        def collect(self) -> Iterator[CounterMetricFamily]:
            family = CounterMetricFamily("t_restarts", "", labels=["model_name"])
            family.add_metric(["a"], next(values))
            yield family

    registry = CollectorRegistry()
    registry.register(Restarting())  # type: ignore[arg-type]
    window = MetricWindow(3600, registry.collect)
    for at in (0, 10, 20, 30):
        window.sample(at, {"t_restarts"})
    catalog = MetricCatalog(lambda: [CounterMetricFamily("t_restarts", "")])
    catalog.refresh()
    rule = parse_rule(
        {"name": "r", "condition": {"kind": "increase", "metric": "t_restarts", "window": 30}, "threshold": 0}
    )
    assert evaluate(rule.condition, [], window, catalog, 30) == {(): 4 + 3 + 1}
    rule = parse_rule(
        {"name": "r", "condition": {"kind": "increase", "metric": "t_restarts", "window": 10}, "threshold": 0}
    )
    assert evaluate(rule.condition, [], window, catalog, 20) == {(): 3}  # from 9 to 3: counted from 0


def test_ratio_average_and_quantile(scene: Scene) -> None:
    ratio = {
        "kind": "ratio",
        "window": 20,
        "numerator": {"metric": "t_requests", "match": {"status": "500"}},
        "denominator": {"metric": "t_requests"},
    }
    assert scene.value(ratio, ["model_name"], 20) == {(("model_name", "a"),): 0.1, (("model_name", "b"),): 0.0}
    assert scene.value({"kind": "average", "metric": "t_waiting", "window": 20}, [], 20) == {
        (): 6.0
    }  # 4 and 8 (none yet at 0)
    p90 = scene.value({"kind": "quantile", "metric": "t_latency_seconds", "quantile": 0.9, "window": 20}, [], 20)
    assert p90 == {(): pytest.approx(0.5)}  # 90 of 100 observations are at most 0.5
    p95 = scene.value({"kind": "quantile", "metric": "t_latency_seconds", "quantile": 0.95, "window": 20}, [], 20)
    assert p95 == {(): pytest.approx(0.5 + 0.5 * 5 / 10)}
    assert scene.value({"kind": "rate", "metric": "t_requests", "window": 5}, [], 20) == {}  # one sample: no value
