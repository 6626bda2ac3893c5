"""Alert notifications: retried with backoff on a failing webhook, never blocking whoever queues
them, e-mailed through SMTP, test-fired through the API; receivers' secrets never logged."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest
from pydantic import SecretStr

from llmos.errors import InvalidRequestError
from llmos.monitoring.alerts.evaluator import Alert, State
from llmos.monitoring.alerts.notify import EmailReceiver, Notifier, Receiver, SmtpSettings, WebhookReceiver
from llmos.monitoring.alerts.payload import alertmanager_payload
from llmos.platform import Platform
from tests.alert_receivers import smtp_server, webhook_receiver
from tests.unit.test_alerts import AUTH, ERRORS_RULE, alert_app


def payload(state: State = State.FIRING) -> dict[str, Any]:
    alert = Alert(
        rule="DiskFull",
        labels={"alertname": "DiskFull", "severity": "critical"},
        annotations={"summary": "the disk is 97% full"},
        state=state,
        value=0.97,
        active_at=1_800_000_000.0,
        fired_at=1_800_000_060.0,
    )
    return alertmanager_payload("DiskFull", [alert], "http://llmos.test")


def test_a_failing_webhook_is_retried_with_backoff_until_it_accepts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "llmos.monitoring.alerts.notify")
    with webhook_receiver(fail_first=2, path="/hook/secret-token?key=hunter2") as hook:
        notifier = Notifier([WebhookReceiver(hook.url, 5)], attempts=4, backoff_s=0.01)
        notifier.start()
        notifier.submit(payload())
        assert notifier.wait_idle(10)
        notifier.stop()
    assert hook.attempts == 3 and hook.payloads == [payload()]
    assert (notifier.delivered, notifier.failed) == (1, 0)
    retries = [r.getMessage() for r in caplog.records]
    assert len(retries) == 2 and "retrying in 0.01s" in retries[0] and "retrying in 0.02s" in retries[1]
    assert all("secret-token" not in m and "hunter2" not in m for m in retries)
    assert f"webhook http://127.0.0.1:{hook.url.split(':')[2].split('/')[0]}" in retries[0]


def test_a_webhook_that_keeps_failing_is_given_up_after_the_attempts() -> None:
    with webhook_receiver(fail_first=100) as hook:
        notifier = Notifier([WebhookReceiver(hook.url, 5)], attempts=3, backoff_s=0.01)
        notifier.start()
        notifier.submit(payload())
        assert notifier.wait_idle(10)
        notifier.stop()
    assert hook.attempts == 3 and (notifier.delivered, notifier.failed) == (0, 1)


class StuckReceiver(Receiver):
    """A receiver that holds each delivery until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.sent: list[dict[str, Any]] = []

    @property
    def name(self) -> str:
        return "stuck"

    def send(self, payload: dict[str, Any]) -> None:
        self.started.set()
        assert self.release.wait(10)
        self.sent.append(payload)


def test_queueing_never_waits_for_a_slow_receiver(caplog: pytest.LogCaptureFixture) -> None:
    receiver = StuckReceiver()
    notifier = Notifier([receiver], attempts=1, backoff_s=0, max_queued=1)
    notifier.start()
    notifier.submit(payload())
    assert receiver.started.wait(10)  # the worker holds the first one
    notifier.submit(payload(State.RESOLVED))  # queued
    notifier.submit(payload())  # the queue is full: dropped, not waited for
    assert "dropped" in caplog.text
    receiver.release.set()
    assert notifier.wait_idle(10)
    notifier.stop()
    assert [p["status"] for p in receiver.sent] == ["firing", "resolved"]


def test_alerts_are_emailed_through_smtp() -> None:
    with smtp_server() as box:
        smtp = SmtpSettings("127.0.0.1", box.port, "llmos@example.org", ("oncall@example.org",), starttls=False)
        notifier = Notifier([EmailReceiver(smtp)], attempts=2, backoff_s=0.01)
        notifier.start()
        notifier.submit(payload())
        assert notifier.wait_idle(10)
        notifier.stop()
    assert box.envelopes == [("llmos@example.org", ["oncall@example.org"])]
    (mail,) = box.messages
    assert mail["Subject"] == "[FIRING:1] DiskFull"
    body = mail.get_payload()
    assert "the disk is 97% full" in body and "alertname = DiskFull" in body
    assert "http://llmos.test/v1/admin/alerts/rules/DiskFull" in body


def test_a_rule_is_test_fired_through_the_api(platform: Platform) -> None:
    with webhook_receiver() as hook, alert_app(platform, alert_webhook_urls=[SecretStr(hook.url)]) as http:
        assert http.post("/v1/admin/alerts/rules", headers=AUTH, json=ERRORS_RULE).status_code == 201
        resp = http.post("/v1/admin/alerts/rules/UnknownModelRequests/test", headers=AUTH)
        assert resp.status_code == 200, resp.text
        assert list(resp.json()["receivers"].values()) == ["delivered"]
        (sent,) = hook.payloads
        assert sent["status"] == "firing" and sent["alerts"][0]["labels"]["test"] == "true"
        assert sent["alerts"][0]["labels"]["alertname"] == "UnknownModelRequests"
        missing = http.post("/v1/admin/alerts/rules/Nope/test", headers=AUTH)
        assert missing.status_code == 404
    with webhook_receiver(fail_first=1) as hook, alert_app(platform, alert_webhook_urls=[SecretStr(hook.url)]) as http:
        failed = http.post("/v1/admin/alerts/rules/UnknownModelRequests/test", headers=AUTH).json()
        assert list(failed["receivers"].values()) == ["failed: answered HTTP 500"]
    with alert_app(platform) as http:
        none = http.post("/v1/admin/alerts/rules/UnknownModelRequests/test", headers=AUTH)
        assert none.status_code == 400 and none.json()["error"]["code"] == "no_alert_receivers"


def test_smtp_without_recipients_stops_the_start(platform: Platform) -> None:
    with pytest.raises(InvalidRequestError) as refused, alert_app(platform, alert_smtp_host="127.0.0.1"):
        pass
    assert refused.value.param == "alert_email_to"
