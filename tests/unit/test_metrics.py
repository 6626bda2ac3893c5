"""GET /metrics after real requests through the app on the tiny models: the counters and
histograms move as they must, label sets stay bounded, and the endpoint is guarded by scope."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from llmos.api import create_app
from llmos.engine.protocol import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelHandle,
    ModelInfo,
    SamplingParams,
)
from llmos.monitoring import metrics
from llmos.monitoring.requests import GenerationMetrics
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(http: TestClient, headers: dict[str, str] = ADMIN) -> Samples:
    resp = http.get("/metrics", headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def label_values(samples: Samples, name: str, label: str) -> set[str]:
    return {dict(labels)[label] for sample_name, labels in samples if sample_name == name and label in dict(labels)}


def test_requests_move_counters_and_histograms(http: TestClient) -> None:
    before = scrape(http)
    whole = http.post("/v1/chat/completions", headers=ADMIN, json=CHAT)
    assert whole.status_code == 200, whole.text
    streamed = http.post("/v1/chat/completions", headers=ADMIN, json=CHAT | {"stream": True, "n": 2})
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    after = scrape(http)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    model = {"model_name": "tiny-chat"}
    usage = whole.json()["usage"]
    # Two requests (three choices), each of 5 tokens: every choice ends by length.
    assert moved("llmos_request_success_total", finished_reason="length", **model) == 3
    assert moved("llmos_time_to_first_token_seconds_count", **model) == 2
    assert moved("llmos_e2e_request_latency_seconds_count", **model) == 2
    assert moved("llmos_request_queue_time_seconds_count", **model) == 2
    assert moved("llmos_request_generation_tokens_sum", **model) == 5 + 10
    assert moved("llmos_request_prompt_tokens_sum", **model) == 2 * usage["prompt_tokens"]
    assert moved("llmos_generation_tokens_total", tenant="default", **model) == 15
    assert moved("llmos_prompt_tokens_total", tenant="default", **model) == 2 * usage["prompt_tokens"]
    # A choice's gaps between tokens: 4 per choice of 5 tokens (deltas may carry several tokens).
    assert 1 <= moved("llmos_inter_token_latency_seconds_count", **model) <= 12
    ttft_buckets = [
        v
        for (n, ls), v in after.items()
        if n == "llmos_time_to_first_token_seconds_bucket" and dict(ls).get("model_name") == "tiny-chat"
    ]  # this model's: earlier tests in the process observed other models
    assert ttft_buckets and max(ttft_buckets) == value(after, "llmos_time_to_first_token_seconds_count", **model)
    assert moved("llmos_prefix_cache_queries_total", **model) >= usage["prompt_tokens"]
    route = {"method": "POST", "route": "/v1/chat/completions"}
    assert moved("llmos_http_requests_total", status="200", **route) == 2
    assert moved("llmos_http_request_duration_seconds_count", **route) == 2
    # Nothing runs now: the gauges say so, for the model that served.
    assert value(after, "llmos_num_requests_running", **model) == 0
    assert value(after, "llmos_num_requests_waiting", **model) == 0
    assert 0 <= value(after, "llmos_kv_cache_usage_perc", **model) <= 1
    assert ("llmos_model_memory_bytes", frozenset(model.items())) in after
    assert value(after, "process_resident_memory_bytes") > 0  # the process collector


def test_errors_are_counted_by_code_and_routes_by_template(http: TestClient) -> None:
    before = scrape(http)
    missing = http.post("/v1/chat/completions", headers=ADMIN, json=CHAT | {"model": "no-such-model"})
    assert missing.status_code == 404
    assert http.get("/v1/models/no-such-model-either", headers=ADMIN).status_code == 404
    assert http.get("/some/raw/path/12345", headers=ADMIN).status_code == 404
    after = scrape(http)
    assert (
        value(after, "llmos_request_errors_total", code="model_not_found")
        - value(before, "llmos_request_errors_total", code="model_not_found")
        == 2
    )
    routes = label_values(after, "llmos_http_requests_total", "route")
    assert "/v1/models/{model}" in routes
    assert "unmatched" in routes
    assert not any("no-such-model" in r or "12345" in r for r in routes)  # never a raw path
    assert not any(
        "no-such-model" in m for m in label_values(after, "llmos_e2e_request_latency_seconds_count", "model_name")
    )


def test_quota_rejections_are_counted_per_tenant(http: TestClient) -> None:
    assert (
        http.post(
            "/v1/admin/tenants", headers=ADMIN, json={"id": "metered", "limits": {"requests_per_minute": 1}}
        ).status_code
        == 201
    )
    key = http.post("/v1/admin/keys", headers=ADMIN, json={"name": "m", "tenant": "metered"}).json()["key"]
    headers = {"Authorization": f"Bearer {key}"}
    before = scrape(http)
    assert http.post("/v1/chat/completions", headers=headers, json=CHAT).status_code == 200
    assert http.post("/v1/chat/completions", headers=headers, json=CHAT).status_code == 429
    after = scrape(http)
    labels = {"tenant": "metered", "reason": "rate_limit_exceeded"}
    assert (
        value(after, "llmos_quota_rejections_total", **labels) - value(before, "llmos_quota_rejections_total", **labels)
        == 1
    )
    assert value(after, "llmos_generation_tokens_total", model_name="tiny-chat", tenant="metered") >= 1


def test_model_label_stays_bounded_under_100_adapters(http: TestClient) -> None:
    """Requests naming 100 adapters: the first names the cap allows, the rest collapse into one value."""
    info = ModelInfo(name="x", task="chat", context_length=64, has_chat_template=True)
    for i in range(100):
        handle = ModelHandle(name=f"alias-{i}", info=dataclasses.replace(info, name=f"adapter-{i:03d}"))
        request = GenerationRequest(f"req-{i}", f"alias-{i}", [1, 2], SamplingParams(max_tokens=1), handle=handle)
        observed = GenerationMetrics(request)
        observed.observe(GenerationDelta(index=0, text="a", token_ids=(5,), finish_reason=FinishReason.STOP))
        observed.close()
    names = label_values(scrape(http), "llmos_e2e_request_latency_seconds_count", "model_name")
    assert len(names) <= metrics.MODEL_NAMES.limit + 2  # + "other" and "unknown"
    assert metrics.OTHER_MODEL in names
    assert not any(n.startswith("alias-") or n.startswith("req-") for n in names)


def test_adapter_gauges_follow_residency() -> None:
    """An adapter label exists only while the adapter is resident."""
    from llmos.monitoring.sampler import MetricsSampler

    resident = [f"lora-{i}" for i in range(100)]
    stats = {"models": {"m1": {"name": "base-x", "adapters": resident[:10]}}}
    sampler = MetricsSampler(lambda: stats, None, 5.0)
    sampler.sample()
    stats["models"]["m1"]["adapters"] = resident[90:]
    sampler.sample()
    text = "".join(
        f"{s.labels['adapter']}\n"
        for family in metrics.LORA_ADAPTER_RESIDENT.collect()
        for s in family.samples
        if s.labels["model_name"] == "base-x"
    ).split()
    assert sorted(text) == resident[90:]
    loaded = metrics.REGISTRY.get_sample_value("llmos_lora_adapters_loaded", {"model_name": "base-x"})
    assert loaded == 10


def test_prefix_cache_counters_keep_only_the_runners_still_there() -> None:
    """The sampler remembers each runner's prefix-cache totals only while the runner is there: a
    model evicted and loaded again counts its new runner's tokens from zero (not from the old
    runner's totals), and replicas replaced one after another leave nothing behind."""
    stats: dict[str, Any] = {"models": {}, "replicas": []}
    from llmos.monitoring.sampler import MetricsSampler

    sampler = MetricsSampler(lambda: stats, None, 5.0)

    def runner(prefill: int, reused: int) -> dict[str, Any]:
        return {"name": "prefix-chat", "prefill_tokens": prefill, "prefix_tokens_reused": reused}

    def counted() -> tuple[float, float]:
        labels = {"model_name": metrics.MODEL_NAMES("prefix-chat")}  # past the cap, other tests' names took it
        queries = metrics.REGISTRY.get_sample_value("llmos_prefix_cache_queries_total", labels) or 0.0
        return queries, metrics.REGISTRY.get_sample_value("llmos_prefix_cache_hits_total", labels) or 0.0

    start = counted()
    stats["models"] = {"m-1": runner(60, 40)}
    sampler.sample()
    stats["models"] = {}  # evicted
    sampler.sample()
    stats["models"] = {"m-1": runner(90, 50)}  # loaded again: a new runner, its totals from zero
    sampler.sample()
    queries, hits = counted()
    assert (queries - start[0], hits - start[1]) == (100 + 140, 40 + 50)

    stats["models"] = {}
    for k in range(20):  # replicas lost and replaced
        stats["replicas"] = [{"id": f"replica-{k}", "models": {"m-1": runner(10, 5)}}]
        sampler.sample()
    assert list(sampler._prefix_seen) == ["replica-19/m-1"]


def test_training_metrics_of_a_running_job(quiet_http: TestClient, loaded_platform: Platform) -> None:
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(4)
    ]
    upload = quiet_http.post(
        "/v1/files",
        headers=ADMIN,
        files={"file": ("t.jsonl", "\n".join(json.dumps(r) for r in rows).encode())},
        data={"purpose": "fine-tune"},
    )
    assert upload.status_code == 200, upload.text
    job = quiet_http.post(
        "/v1/fine_tuning/jobs", headers=ADMIN, json={"model": "tiny-chat", "training_file": upload.json()["id"]}
    )
    assert job.status_code == 200, job.text
    job_id = job.json()["id"]
    jobs = loaded_platform.jobs
    assert jobs.claim(job_id) is not None  # as a supervisor does before starting the worker
    # What the worker process writes (through the job store) is what the server exports.
    jobs.record_metrics(job_id, {"step": 1, "train_loss": 2.5, "train_accuracy": 0.25, "tokens_per_second": 10.0})
    jobs.record_metrics(job_id, {"step": 2, "train_loss": 1.5, "train_accuracy": 0.5, "tokens_per_second": 40.0})
    samples = scrape(quiet_http)
    assert value(samples, "llmos_fine_tuning_jobs", status="running") == 1
    assert value(samples, "llmos_training_loss", job_id=job_id) == 1.5
    assert value(samples, "llmos_training_accuracy", job_id=job_id) == 0.5
    assert value(samples, "llmos_training_tokens_per_second", job_id=job_id) == 40.0
    history = quiet_http.get("/v1/admin/metrics/history", headers=ADMIN)
    assert history.status_code == 200 and history.json()["object"] == "list"


def _error(resp: object, status: int) -> dict:
    assert resp.status_code == status, resp.text  # type: ignore[attr-defined]
    body = resp.json()["error"]  # type: ignore[attr-defined]
    assert set(body) == {"message", "type", "param", "code"}
    return body


def test_metrics_need_the_metrics_scope(http: TestClient, loaded_platform: Platform) -> None:
    _error(http.get("/metrics"), 401)
    _error(http.get("/metrics", headers={"Authorization": "Bearer sk-llmos-wrong"}), 401)
    _, inference = loaded_platform.keys.create("app", scopes=("inference",))
    body = _error(http.get("/metrics", headers={"Authorization": f"Bearer {inference}"}), 403)
    assert "metrics" in body["message"]
    _error(http.get("/v1/admin/metrics/history", headers={"Authorization": f"Bearer {inference}"}), 403)
    _, reader = loaded_platform.keys.create("prometheus", scopes=("metrics",))
    assert "llmos_num_requests_running" in http.get("/metrics", headers={"Authorization": f"Bearer {reader}"}).text
    # A metrics key reads metrics, nothing else.
    _error(http.post("/v1/chat/completions", headers={"Authorization": f"Bearer {reader}"}, json=CHAT), 403)


@pytest.fixture
def app_with(loaded_platform: Platform) -> Iterator[object]:
    clients: list[TestClient] = []

    def build(**settings: object) -> TestClient:
        changed = loaded_platform.settings.model_copy(update={"max_concurrent_jobs": 0, **settings})
        client = TestClient(create_app(platform=dataclasses.replace(loaded_platform, settings=changed)))
        clients.append(client.__enter__())
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


def test_metrics_public_opens_the_endpoint_only(app_with: object) -> None:
    http = app_with(metrics_public=True)  # type: ignore[operator]
    assert "llmos_request_success_total" in http.get("/metrics").text
    _error(http.get("/v1/admin/metrics/history"), 401)
    _error(http.post("/v1/chat/completions", json=CHAT), 401)


def test_metrics_disabled_records_nothing(app_with: object) -> None:
    http = app_with(metrics_enabled=False)  # type: ignore[operator]
    before = metrics.REGISTRY.get_sample_value("llmos_e2e_request_latency_seconds_count", {"model_name": "tiny-chat"})
    assert http.post("/v1/chat/completions", headers=ADMIN, json=CHAT).status_code == 200
    after = metrics.REGISTRY.get_sample_value("llmos_e2e_request_latency_seconds_count", {"model_name": "tiny-chat"})
    assert before == after
    _error(http.get("/metrics", headers=ADMIN), 404)
