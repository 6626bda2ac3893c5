"""The gauges, sampled: the engine's stats and the job store read every few seconds (and right
before each scrape), off the request path, plus the last hour of a few series for the console.

The engine already keeps its numbers (``EngineClient.stats``: each resident model's running and
waiting requests, batch, cache reservations, adapters, prefix-cache tokens), so they are read
here rather than counted twice. Training metrics come from the job store, where each worker
process writes its reports as ``metrics`` events: one writer per job, whatever process runs it
(docs/adr/0009-metrics.md says why this rather than prometheus_client's multiprocess mode).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from llmos.kernel.job_queries import JobQueries
from llmos.kernel.job_status import JobStatus
from llmos.monitoring import metrics

log = logging.getLogger(__name__)
HISTORY_S = 3600.0
"""How far back ``history`` reaches."""


@dataclass(frozen=True)
class Point:
    """One sample of the series the console charts (rates and means since the previous point)."""

    time: float
    generation_tokens_per_second: float
    requests_per_second: float
    errors_per_second: float
    time_to_first_token_mean_seconds: float | None
    e2e_request_latency_mean_seconds: float | None
    requests_running: float
    requests_waiting: float
    kv_cache_usage_max: float
    running_jobs: float
    classification_label_shares: dict[str, dict[str, float]]
    """Per classification model, each label's share of the inputs it classified since the
    previous point (a model that classified nothing is left out): the sentiment monitor's chart."""


class _ModelTotals:
    """One model name's numbers summed over its runners (a llama.cpp model may have a torch twin)."""

    def __init__(self) -> None:
        self.running = self.waiting = self.batch = self.adapters = self.memory = 0.0
        self.kv = 0.0


def _total(metric: Counter | Histogram, suffix: str) -> float:
    """The sum of one sample kind (``_total``, ``_sum``, ``_count``) over every label set."""
    return sum(s.value for family in metric.collect() for s in family.samples if s.name.endswith(suffix))


class LabelledGauge:
    """A gauge whose label sets are replaced wholesale each sample: a set not seen again
    (a model evicted, a job finished) is removed rather than left at its last value."""

    def __init__(self, gauge: Gauge) -> None:
        self.gauge = gauge
        self._labels: set[tuple[str, ...]] = set()

    def replace(self, values: dict[tuple[str, ...], float]) -> None:
        for labels, value in values.items():
            self.gauge.labels(*labels).set(value)
        for gone in self._labels - set(values):
            self.gauge.remove(*gone)
        self._labels = set(values)


class MetricsSampler:
    def __init__(
        self,
        stats: Callable[[], dict[str, Any]],
        jobs: JobQueries | None,
        interval_s: float,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stats = stats
        self.jobs = jobs
        self.interval_s = interval_s
        self.clock = clock
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gauges = {
            gauge: LabelledGauge(gauge)
            for gauge in (
                metrics.NUM_REQUESTS_RUNNING,
                metrics.NUM_REQUESTS_WAITING,
                metrics.BATCH_CURRENT_SIZE,
                metrics.KV_CACHE_USAGE,
                metrics.LORA_ADAPTERS_LOADED,
                metrics.LORA_ADAPTER_RESIDENT,
                metrics.MODEL_MEMORY,
                metrics.REPLICA_REQUESTS_RUNNING,
                metrics.REPLICA_REQUESTS_WAITING,
                metrics.REPLICA_SERVER_IN_FLIGHT,
                metrics.TRAINING_TOKENS_PER_SECOND,
                metrics.TRAINING_LOSS,
                metrics.TRAINING_ACCURACY,
            )
        }
        self._prefix_seen: dict[str, tuple[int, int]] = {}
        """Each runner's cumulative (queried, reused) prompt tokens at the previous sample."""
        self._replica_tokens_seen: dict[str, tuple[tuple[str, ...], int]] = {}
        """Each replica runner's labels and cumulative generated tokens at the previous sample."""
        self._history: deque[Point] = deque(maxlen=max(2, int(HISTORY_S / interval_s)))
        self._previous: tuple[float, dict[str, float]] | None = None
        self._previous_labels: dict[tuple[str, str], float] = {}

    # -- the thread --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
                self.record_point()
            except Exception:  # a failed sample (the database busy) must not end the sampling
                log.exception("sampling the metrics failed")

    # -- sampling ----------------------------------------------------------------------------
    def sample(self) -> None:
        """Set every gauge from the engine's stats and the job store."""
        with self._lock:
            self._sample_engine(self.stats())
            if self.jobs is not None:
                self._sample_jobs(self.jobs)

    def _sample_engine(self, stats: dict[str, Any]) -> None:
        metrics.ENGINE_RESTARTS.set(stats.get("engine_restarts", 0))
        if "memory_budget_bytes" in stats:
            metrics.MEMORY_BUDGET.set(stats["memory_budget_bytes"])
        totals: dict[str, _ModelTotals] = {}
        adapters: dict[tuple[str, ...], float] = {}
        runners = dict(stats.get("models", {}))
        for replica in stats.get("replicas", []):  # Ray cluster mode: a model's gauges sum its replicas'
            runners |= {f"{replica['id']}/{key}": entry for key, entry in replica.get("models", {}).items()}
        prefix_seen: dict[str, tuple[int, int]] = {}
        for key, entry in runners.items():
            # Not capped: these series go when the model is evicted, so residency bounds them.
            name = str(entry.get("name", key))
            model = totals.setdefault(name, _ModelTotals())
            model.running += entry.get("requests_running", 0)
            model.waiting += entry.get("requests_waiting", 0)
            model.batch += entry.get("batch_size", 0)
            model.memory += entry.get("memory_bytes", 0)
            model.kv = max(model.kv, entry.get("kv_cache_usage", 0.0))
            resident = entry.get("adapters", [])
            model.adapters += len(resident)
            adapters.update({(name, str(adapter)): 1.0 for adapter in resident})
            if "prefix_tokens_reused" in entry:
                prefix_seen[key] = self._count_prefix(key, metrics.MODEL_NAMES(name), entry)
        # Only the runners of this sample are kept: a replica replaced, or a model evicted, would
        # otherwise stay here for good, and one loaded again would count from its old totals.
        self._prefix_seen = prefix_seen
        self._set(metrics.NUM_REQUESTS_RUNNING, {(n,): m.running for n, m in totals.items()})
        self._set(metrics.NUM_REQUESTS_WAITING, {(n,): m.waiting for n, m in totals.items()})
        self._set(metrics.BATCH_CURRENT_SIZE, {(n,): m.batch for n, m in totals.items()})
        self._set(metrics.KV_CACHE_USAGE, {(n,): m.kv for n, m in totals.items()})
        self._set(metrics.LORA_ADAPTERS_LOADED, {(n,): m.adapters for n, m in totals.items()})
        self._set(metrics.MODEL_MEMORY, {(n,): m.memory for n, m in totals.items() if m.memory})
        self._set(metrics.LORA_ADAPTER_RESIDENT, adapters)
        self._sample_replicas(stats.get("replicas", []))

    def _sample_replicas(self, replicas: list[dict[str, Any]]) -> None:
        """Each engine replica's running and waiting requests and generated tokens, as it reports
        them (every server's requests), and the requests this server has in flight on it (Ray
        cluster mode; the in-process engine reports no replicas)."""
        running: dict[tuple[str, ...], float] = {}
        waiting: dict[tuple[str, ...], float] = {}
        in_flight: dict[tuple[str, ...], float] = {}
        tokens: dict[str, tuple[tuple[str, ...], int]] = {}
        for replica in replicas:
            # Ready ones only: a replica another server is still placing has this server's
            # provisional id and node until its first report (``pool.Replica.take_report``).
            if replica.get("state") == "ready" and "server_in_flight" in replica:
                where = (str(replica["model"]), str(replica["id"]), str(replica.get("node_address", "")))
                in_flight[where] = float(replica["server_in_flight"])
            for key, entry in replica.get("models", {}).items():
                labels: tuple[str, ...] = (
                    str(entry.get("name", key)),
                    str(replica["id"]),
                    str(replica.get("node_address", "")),
                )
                running[labels] = running.get(labels, 0.0) + entry.get("requests_running", 0)
                waiting[labels] = waiting.get(labels, 0.0) + entry.get("requests_waiting", 0)
                tokens[f"{replica['id']}/{key}"] = (labels, int(entry.get("tokens_generated", 0)))
        self._set(metrics.REPLICA_REQUESTS_RUNNING, running)
        self._set(metrics.REPLICA_REQUESTS_WAITING, waiting)
        self._set(metrics.REPLICA_SERVER_IN_FLIGHT, in_flight)
        for runner, (labels, count) in tokens.items():
            last = self._replica_tokens_seen.get(runner, (labels, 0))[1]
            metrics.REPLICA_GENERATION_TOKENS.labels(*labels).inc(_grown(last, count))
        for gone in {labels for labels, _ in self._replica_tokens_seen.values()} - {lb for lb, _ in tokens.values()}:
            metrics.REPLICA_GENERATION_TOKENS.remove(*gone)  # a replica stopped or lost: its series go too
        self._replica_tokens_seen = tokens

    def _count_prefix(self, key: str, name: str, entry: dict[str, Any]) -> tuple[int, int]:
        """The prefix-cache counters advance by what the runner computed since the last sample
        (a runner replaced after a crash starts again from zero); its totals now, returned."""
        reused = int(entry["prefix_tokens_reused"])
        queried = int(entry.get("prefill_tokens", 0)) + reused
        last_queried, last_reused = self._prefix_seen.get(key, (0, 0))
        if queried < last_queried or reused < last_reused:
            last_queried = last_reused = 0
        metrics.PREFIX_CACHE_QUERIES.labels(name).inc(queried - last_queried)
        metrics.PREFIX_CACHE_HITS.labels(name).inc(reused - last_reused)
        return queried, reused

    def _sample_jobs(self, jobs: JobQueries) -> None:
        counts = jobs.status_counts()
        for status in JobStatus:
            metrics.FINE_TUNING_JOBS.labels(status.value).set(counts.get(status.value, 0))
        speed: dict[tuple[str, ...], float] = {}
        loss: dict[tuple[str, ...], float] = {}
        accuracy: dict[tuple[str, ...], float] = {}
        for job_id, report in jobs.running_metrics().items():
            if "tokens_per_second" in report:
                speed[(job_id,)] = float(report["tokens_per_second"])
            if "train_loss" in report:
                loss[(job_id,)] = float(report["train_loss"])
            for name, value in report.items():
                if name.startswith("train_") and name.endswith("accuracy"):
                    accuracy[(job_id,)] = float(value)
        self._set(metrics.TRAINING_TOKENS_PER_SECOND, speed)
        self._set(metrics.TRAINING_LOSS, loss)
        self._set(metrics.TRAINING_ACCURACY, accuracy)

    def _set(self, gauge: Gauge, values: dict[tuple[str, ...], float]) -> None:
        self._gauges[gauge].replace(values)

    # -- the last hour ------------------------------------------------------------------------
    def record_point(self) -> None:
        """Add a point to the history: rates and means since the previous point."""
        now = self.clock()
        totals = {
            "tokens": _total(metrics.GENERATION_TOKENS, "_total"),
            "requests": _total(metrics.E2E_REQUEST_LATENCY, "_count"),
            "errors": _total(metrics.REQUEST_ERRORS, "_total"),
            "ttft_sum": _total(metrics.TIME_TO_FIRST_TOKEN, "_sum"),
            "ttft_count": _total(metrics.TIME_TO_FIRST_TOKEN, "_count"),
            "e2e_sum": _total(metrics.E2E_REQUEST_LATENCY, "_sum"),
        }
        labels, previous_labels = _label_counts(), self._previous_labels
        self._previous_labels = labels
        previous = self._previous
        self._previous = (now, totals)
        if previous is None:
            return
        elapsed = max(now - previous[0], 1e-9)
        delta = {name: totals[name] - previous[1].get(name, 0.0) for name in totals}
        self._history.append(
            Point(
                time=now,
                generation_tokens_per_second=delta["tokens"] / elapsed,
                requests_per_second=delta["requests"] / elapsed,
                errors_per_second=delta["errors"] / elapsed,
                time_to_first_token_mean_seconds=_mean(delta["ttft_sum"], delta["ttft_count"]),
                e2e_request_latency_mean_seconds=_mean(delta["e2e_sum"], delta["requests"]),
                requests_running=_gauge_sum(metrics.NUM_REQUESTS_RUNNING),
                requests_waiting=_gauge_sum(metrics.NUM_REQUESTS_WAITING),
                kv_cache_usage_max=max(_gauge_values(metrics.KV_CACHE_USAGE), default=0.0),
                running_jobs=sum(
                    s.value
                    for family in metrics.FINE_TUNING_JOBS.collect()
                    for s in family.samples
                    if s.labels.get("status") == JobStatus.RUNNING.value
                ),
                classification_label_shares=_shares(labels, previous_labels),
            )
        )

    def history(self) -> list[dict[str, Any]]:
        return [asdict(point) for point in list(self._history)]


def _grown(last: int, now: int) -> int:
    """How far a runner's cumulative count advanced since it read ``last``: all of ``now`` when it
    went back (the runner was replaced and counts from zero again)."""
    return now if now < last else now - last


def _label_counts() -> dict[tuple[str, str], float]:
    """Inputs classified so far, by (model, label)."""
    return {
        (s.labels["model_name"], s.labels["label"]): s.value
        for family in metrics.CLASSIFICATION_LABELS.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }


def _shares(now: dict[tuple[str, str], float], before: dict[tuple[str, str], float]) -> dict[str, dict[str, float]]:
    grown: dict[str, dict[str, float]] = {}
    for (model, label), value in now.items():
        if (added := value - before.get((model, label), 0.0)) > 0:
            grown.setdefault(model, {})[label] = added
    return {
        model: {k: round(v / sum(counts.values()), 4) for k, v in counts.items()} for model, counts in grown.items()
    }


def _mean(total: float, count: float) -> float | None:
    return total / count if count > 0 else None


def _gauge_values(gauge: Gauge) -> Iterable[float]:
    return (s.value for family in gauge.collect() for s in family.samples)


def _gauge_sum(gauge: Gauge) -> float:
    return sum(_gauge_values(gauge))
