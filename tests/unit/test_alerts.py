"""Alert rules through the admin API, driven through pending, firing and resolved with an explicit
clock, real requests moving the metrics, and a webhook on loopback receiving Alertmanager's payload."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from llmos.api import create_app
from llmos.config import Settings
from llmos.errors import InvalidRequestError
from llmos.monitoring.alerts.service import AlertService
from llmos.platform import Platform
from tests.alert_receivers import Webhook, webhook_receiver
from tests.conftest import ADMIN_KEY

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
ERRORS_RULE: dict[str, Any] = {
    "name": "UnknownModelRequests",
    "condition": {
        "kind": "rate",
        "metric": "llmos_request_errors_total",
        "match": {"code": "model_not_found"},
        "window": "10s",
    },
    "op": ">",
    "threshold": 0,
    "for": "5s",
    "severity": "critical",
    "labels": {"team": "serving"},
    "annotations": {"summary": "{{ $value }} requests/s for unknown models ({{ $labels.team }})"},
}


@pytest.fixture
def hook() -> Iterator[Webhook]:
    with webhook_receiver(path="/hook/secret-token") as receiver:
        yield receiver


def alert_app(platform: Platform, **settings: Any) -> TestClient:
    update = {"alert_evaluation_interval_s": 0, "alert_default_rules": False, "alert_notify_backoff_s": 0.01}
    changed = platform.settings.model_copy(update={**update, **settings})
    return TestClient(create_app(platform=dataclasses.replace(platform, settings=changed)))


def tick(http: TestClient, now: float) -> None:
    service: AlertService = http.app.state.alerts  # type: ignore[attr-defined]
    service.tick(now)
    assert service.notifier.wait_idle(10)


def unknown_model_requests(http: TestClient, n: int) -> None:
    for _ in range(n):
        body = {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}
        assert http.post("/v1/chat/completions", headers=AUTH, json=body).status_code == 404


def test_a_rule_goes_pending_firing_resolved_and_notifies_the_webhook(platform: Platform, hook: Webhook) -> None:
    with alert_app(platform, alert_webhook_urls=[SecretStr(hook.url)], alert_external_url="http://llmos.test") as http:
        created = http.post("/v1/admin/alerts/rules", headers=AUTH, json=ERRORS_RULE)
        assert created.status_code == 201, created.text
        assert created.json()["source"] == "api" and created.json()["state"] == "inactive"
        t0 = time.time()
        tick(http, t0)
        unknown_model_requests(http, 3)
        tick(http, t0 + 2)
        state = http.get("/v1/admin/alerts", headers=AUTH).json()["data"]
        assert [(s["rule"], s["state"]) for s in state] == [("UnknownModelRequests", "pending")]
        assert hook.payloads == []  # pending notifies nobody
        tick(http, t0 + 4)  # held 2 s of the 5 s `for`
        assert http.get("/v1/admin/alerts/rules/UnknownModelRequests", headers=AUTH).json()["state"] == "pending"
        tick(http, t0 + 8)
        rule = http.get("/v1/admin/alerts/rules/UnknownModelRequests", headers=AUTH).json()
        assert rule["state"] == "firing" and rule["alerts"][0]["value"] == pytest.approx(3 / 8)

        assert len(hook.payloads) == 1
        firing = hook.payloads[0]
        assert firing["version"] == "4" and firing["status"] == "firing" and firing["receiver"] == "llmos"
        assert firing["groupLabels"] == {"alertname": "UnknownModelRequests"}
        assert firing["externalURL"] == "http://llmos.test"
        labels = {"alertname": "UnknownModelRequests", "severity": "critical", "team": "serving"}
        assert firing["commonLabels"] == labels
        (alert,) = firing["alerts"]
        assert alert["status"] == "firing" and alert["labels"] == labels
        assert alert["annotations"] == {"summary": "0.375 requests/s for unknown models (serving)"}
        assert alert["endsAt"] == "0001-01-01T00:00:00Z" and alert["startsAt"].endswith("Z")
        assert alert["generatorURL"] == "http://llmos.test/v1/admin/alerts/rules/UnknownModelRequests"
        assert len(alert["fingerprint"]) == 16

        tick(http, t0 + 9)  # the window still holds the requests (sent before t0 + 2)
        assert len(hook.payloads) == 1  # notified once, not at every evaluation
        tick(http, t0 + 15)  # no errors in the last 10 s
        assert len(hook.payloads) == 2
        resolved = hook.payloads[1]
        assert resolved["status"] == "resolved" and resolved["alerts"][0]["status"] == "resolved"
        assert resolved["alerts"][0]["fingerprint"] == alert["fingerprint"]
        assert resolved["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
        assert hook.paths == ["/hook/secret-token"] * 2

        history = http.get("/v1/admin/alerts/history", headers=AUTH).json()["data"]
        transitions = [(e["previous"], e["state"]) for e in reversed(history)]
        assert transitions == [("inactive", "pending"), ("pending", "firing"), ("firing", "resolved")]
        assert history[0]["at"] == pytest.approx(t0 + 15, abs=1e-3)
        assert all(e["rule"] == "UnknownModelRequests" and e["labels"] == labels for e in history)
        page = http.get("/v1/admin/alerts/history", headers=AUTH, params={"limit": 1, "after": history[0]["id"]})
        assert [e["state"] for e in page.json()["data"]] == ["firing"]


def test_a_condition_that_stops_while_pending_goes_back_to_inactive(platform: Platform, hook: Webhook) -> None:
    with alert_app(platform, alert_webhook_urls=[SecretStr(hook.url)]) as http:
        assert http.post("/v1/admin/alerts/rules", headers=AUTH, json=ERRORS_RULE).status_code == 201
        t0 = time.time()
        tick(http, t0)
        unknown_model_requests(http, 1)
        tick(http, t0 + 2)
        tick(http, t0 + 13)  # out of the window before the `for` was reached
        assert http.get("/v1/admin/alerts/rules/UnknownModelRequests", headers=AUTH).json()["state"] == "inactive"
        history = http.get("/v1/admin/alerts/history", headers=AUTH).json()["data"]
        assert [(e["previous"], e["state"]) for e in reversed(history)] == [
            ("inactive", "pending"),
            ("pending", "inactive"),
        ]
        assert hook.payloads == []


def test_rules_are_created_replaced_and_deleted(platform: Platform) -> None:
    with alert_app(platform) as http:
        assert http.post("/v1/admin/alerts/rules", headers=AUTH, json=ERRORS_RULE).status_code == 201
        again = http.post("/v1/admin/alerts/rules", headers=AUTH, json=ERRORS_RULE)
        assert again.status_code == 409 and again.json()["error"]["param"] == "name"
        changed = {**ERRORS_RULE, "threshold": 2.5, "for": 60}
        put = http.put("/v1/admin/alerts/rules/UnknownModelRequests", headers=AUTH, json=changed)
        assert put.status_code == 200 and put.json()["threshold"] == 2.5 and put.json()["for"] == 60
        renamed = http.put("/v1/admin/alerts/rules/UnknownModelRequests", headers=AUTH, json={**changed, "name": "B"})
        assert renamed.status_code == 400 and renamed.json()["error"]["param"] == "name"
        assert [r["name"] for r in http.get("/v1/admin/alerts/rules", headers=AUTH).json()["data"]] == [
            "UnknownModelRequests"
        ]
    with alert_app(platform) as http:  # kept in the database across restarts
        assert http.get("/v1/admin/alerts/rules/UnknownModelRequests", headers=AUTH).json()["threshold"] == 2.5
        assert http.delete("/v1/admin/alerts/rules/UnknownModelRequests", headers=AUTH).status_code == 200
        gone = http.get("/v1/admin/alerts/rules/UnknownModelRequests", headers=AUTH)
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"


def _rule(**changes: Any) -> dict[str, Any]:
    return {**ERRORS_RULE, **changes}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (_rule(condition={**ERRORS_RULE["condition"], "metric": "llmos_no_such_metric_total"}), "condition.metric"),
        (_rule(condition={**ERRORS_RULE["condition"], "metric": "llmos_kv_cache_usage_perc"}), "condition.metric"),
        (_rule(condition={**ERRORS_RULE["condition"], "window": "5 minutes"}), "condition.window"),
        (_rule(condition={**ERRORS_RULE["condition"], "window": "30d"}), "condition.window"),
        (_rule(condition={**ERRORS_RULE["condition"], "window": "0s"}), "condition.window"),
        (_rule(condition={**ERRORS_RULE["condition"], "kind": "predict_linear"}), "condition"),
        (_rule(condition={**ERRORS_RULE["condition"], "match_re": {"code": "("}}), "condition.match_re"),
        (_rule(op="=~"), "op"),
        (_rule(op="outside"), "threshold"),
        (_rule(threshold="high"), "threshold"),
        (_rule(annotations={"summary": "{{ .Value }}"}), "annotations"),
        (_rule(annotations={"summary": "{{ $labels.x | exec }}"}), "annotations"),
        (_rule(name="no spaces"), "name"),
        (_rule(severity="page"), "severity"),
        (_rule(unknown_field=1), "unknown_field"),
        (
            _rule(condition={"kind": "quantile", "metric": "llmos_time_to_first_token_seconds", "window": 60}),
            "condition.quantile",
        ),
        (_rule(condition={"kind": "label_drift", "window": 60, "reference_window": 60}, by=["model_name"]), "by"),
    ],
)
def test_bad_rules_are_refused_with_400_naming_the_field(platform: Platform, body: dict[str, Any], param: str) -> None:
    with alert_app(platform, alert_max_window_s=86400) as http:
        resp = http.post("/v1/admin/alerts/rules", headers=AUTH, json=body)
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == param and resp.json()["error"]["type"] == "invalid_request_error"
        assert http.get("/v1/admin/alerts/rules", headers=AUTH).json()["data"] == []  # nothing half-kept


def test_a_window_shorter_than_the_evaluation_interval_is_refused(platform: Platform) -> None:
    with alert_app(platform, alert_evaluation_interval_s=30) as http:
        resp = http.post("/v1/admin/alerts/rules", headers=AUTH, json=ERRORS_RULE)
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "condition.window"


def test_alert_routes_need_the_admin_scope(platform: Platform) -> None:
    _, secret = platform.keys.create("inference only", scopes=("inference",))
    with alert_app(platform) as http:
        for method, path in [
            ("get", "/v1/admin/alerts"),
            ("get", "/v1/admin/alerts/history"),
            ("get", "/v1/admin/alerts/rules"),
            ("post", "/v1/admin/alerts/rules"),
            ("get", "/v1/admin/alerts/rules/x"),
            ("put", "/v1/admin/alerts/rules/x"),
            ("delete", "/v1/admin/alerts/rules/x"),
            ("post", "/v1/admin/alerts/rules/x/test"),
        ]:
            body = ERRORS_RULE if method in ("post", "put") else None
            assert http.request(method, path, json=body).status_code == 401, path
            denied = http.request(method, path, json=body, headers={"Authorization": f"Bearer {secret}"})
            assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error", path
        assert http.get("/v1/admin/alerts/rules", headers=AUTH).json()["data"] == []


def test_shipped_rules_load_and_are_read_only(platform: Platform) -> None:
    with alert_app(platform, alert_default_rules=True) as http:
        rules = {r["name"]: r for r in http.get("/v1/admin/alerts/rules", headers=AUTH).json()["data"]}
        assert set(rules) == {
            "HighErrorRate",
            "HighTimeToFirstToken",
            "RequestQueueBacklog",
            "KVCacheNearlyFull",
            "FineTuningJobsFailed",
            "EngineRestarted",
        }
        assert {r["source"] for r in rules.values()} == {"default"}
        refused = http.delete("/v1/admin/alerts/rules/HighErrorRate", headers=AUTH)
        assert refused.status_code == 409 and "alert_default_rules" in refused.json()["error"]["message"]


def test_a_rules_file_is_loaded_and_a_bad_one_stops_the_start(platform: Platform, tmp_path: Path) -> None:
    good = tmp_path / "rules.yaml"
    good.write_text(
        "rules:\n  - name: QueueLong\n    condition: {kind: average, metric: llmos_num_requests_waiting, window: 1m}\n"
        "    threshold: 10\n"
    )
    with alert_app(platform, alert_rules_file=good) as http:
        (rule,) = http.get("/v1/admin/alerts/rules", headers=AUTH).json()["data"]
        assert rule["name"] == "QueueLong" and rule["source"] == "file" and rule["op"] == ">"
    bad = tmp_path / "bad.yaml"
    bad.write_text("- name: Q\n  condition: {kind: average, metric: llmos_nope, window: 1m}\n  threshold: 1\n")
    with pytest.raises(InvalidRequestError) as refused, alert_app(platform, alert_rules_file=bad):
        pass
    assert refused.value.param == "condition.metric"
    python = tmp_path / "python.yaml"  # the safe loader builds no Python objects
    python.write_text("- !!python/object/apply:os.system ['true']\n")
    with pytest.raises(InvalidRequestError), alert_app(platform, alert_rules_file=python):
        pass


def test_webhook_urls_are_validated_and_never_shown(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"alert_webhook_urls\[0\]") as refused:
        Settings(home=tmp_path, alert_webhook_urls=["ftp://hooks.example/secret-token"])
    assert "secret-token" not in str(refused.value)
    settings = Settings(home=tmp_path, alert_webhook_urls=["https://hooks.example/secret-token"])
    assert "secret-token" not in str(settings.as_public_dict())
