"""The alerting service: its rules (shipped defaults, the operator's file, the API's), the metric
window it samples, the evaluator, the history and the notifier, ticked by one background thread
every ``alert_evaluation_interval_s`` (never on a request's path)."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

from llmos.config import Settings
from llmos.errors import ConflictError, InvalidRequestError, NotFoundError
from llmos.monitoring.alerts.catalog import MetricCatalog
from llmos.monitoring.alerts.evaluator import Alert, Evaluator, State, Transition
from llmos.monitoring.alerts.functions import evaluate
from llmos.monitoring.alerts.history import AlertHistory, RuleTable
from llmos.monitoring.alerts.notify import EmailReceiver, Notifier, Receiver, SmtpSettings, WebhookReceiver
from llmos.monitoring.alerts.payload import alertmanager_payload
from llmos.monitoring.alerts.rules import Rule, load_rules_file, parse_rule
from llmos.monitoring.alerts.window import MetricWindow
from llmos.registry.db import Database

log = logging.getLogger(__name__)
DEFAULT_RULES = Path(__file__).with_name("default_rules.yaml")
Source = Literal["default", "file", "api"]


@dataclass(frozen=True)
class RuleEntry:
    rule: Rule
    source: Source


class AlertService:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        *,
        collect: Callable[[], Iterable[Metric]] = REGISTRY.collect,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.interval_s = settings.alert_evaluation_interval_s
        self.catalog = MetricCatalog(collect)
        self.window = MetricWindow(settings.alert_max_window_s + 2 * self.interval_s, collect)
        self.evaluator = Evaluator()
        self.history = AlertHistory(db)
        self.table = RuleTable(db)
        self.notifier = notifier or Notifier(
            receivers(settings), attempts=settings.alert_notify_attempts, backoff_s=settings.alert_notify_backoff_s
        )
        self._rules: dict[str, RuleEntry] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._load()

    # -- rules ---------------------------------------------------------------------------------
    def _load(self) -> None:
        """Defaults, then the operator's file (which may redefine a default by its name), then the
        API's rules. A bad shipped or file rule stops the server; a stored API rule that no longer
        checks (its metric is gone) is skipped with a warning."""
        sources: list[tuple[Source, list[Rule]]] = []
        if self.settings.alert_default_rules:
            sources.append(("default", load_rules_file(DEFAULT_RULES)))
        if self.settings.alert_rules_file is not None:
            sources.append(("file", load_rules_file(self.settings.alert_rules_file)))
        for source, rules in sources:
            for rule in rules:
                self._check(rule)
                self._rules[rule.name] = RuleEntry(rule, source)
        for spec in self.table.all():
            try:
                rule = parse_rule(spec)
                self._check(rule)
            except InvalidRequestError as exc:
                log.warning("alert rule %s from the database skipped: %s", spec.get("name"), exc.message)
                continue
            if (taken := self._rules.get(rule.name)) is not None:
                log.warning("alert rule %s from the database skipped: a %s rule has its name", rule.name, taken.source)
                continue
            self._rules[rule.name] = RuleEntry(rule, "api")

    def _check(self, rule: Rule) -> None:
        self.catalog.check(rule, interval_s=self.interval_s, max_window_s=self.settings.alert_max_window_s)

    def _entry(self, name: str) -> RuleEntry:
        entry = self._rules.get(name)
        if entry is None:
            raise NotFoundError(f"no alert rule {name!r}", param="name")
        return entry

    def list_rules(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._public(e) for e in self._rules.values()]

    def get_rule(self, name: str) -> dict[str, Any]:
        with self._lock:
            return self._public(self._entry(name))

    def create_rule(self, rule: Rule) -> dict[str, Any]:
        self._check(rule)
        with self._lock:
            if rule.name in self._rules:
                raise ConflictError(f"alert rule {rule.name!r} exists", param="name")
            self.table.put(rule)
            self._rules[rule.name] = RuleEntry(rule, "api")
            return self._public(self._rules[rule.name])

    def replace_rule(self, name: str, rule: Rule) -> dict[str, Any]:
        if rule.name != name:
            raise InvalidRequestError("a rule's name cannot change; create a new rule instead", param="name")
        self._check(rule)
        with self._lock:
            self._writable(name)
            self.table.put(rule)
            self.evaluator.forget(name)
            self._rules[name] = RuleEntry(rule, "api")
            return self._public(self._rules[name])

    def delete_rule(self, name: str) -> dict[str, Any]:
        with self._lock:
            entry = self._writable(name)
            self.table.delete(name)
            self.evaluator.forget(name)
            del self._rules[name]
            return {**self._public(entry), "deleted": True}

    def _writable(self, name: str) -> RuleEntry:
        entry = self._entry(name)
        if entry.source != "api":
            where = "alert_rules_file" if entry.source == "file" else "the shipped defaults (alert_default_rules)"
            raise ConflictError(f"alert rule {name!r} comes from {where}; change it there", param="name")
        return entry

    def _public(self, entry: RuleEntry) -> dict[str, Any]:
        alerts = self.evaluator.alerts(entry.rule.name)
        return {
            "object": "alert_rule",
            **entry.rule.public(),
            "source": entry.source,
            "state": _worst(alerts),
            "alerts": [a.public() for a in alerts],
        }

    # -- evaluation ----------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> list[Transition]:
        """Sample the metrics, evaluate every enabled rule at ``now``, record and notify changes."""
        now = time.time() if now is None else now
        with self._lock:
            rules = [e.rule for e in self._rules.values() if e.rule.enabled]
            self.window.sample(now, {f for r in rules for f in self.catalog.families_of(r)})
            changes = []
            for rule in rules:
                values = evaluate(rule.condition, rule.by, self.window, self.catalog, now)
                changes += self.evaluator.apply(rule, values, now)
        self.history.record(changes)
        notify: dict[str, list[Alert]] = defaultdict(list)
        for change in changes:
            if change.alert.state in (State.FIRING, State.RESOLVED):
                notify[change.alert.rule].append(change.alert)
        for rule_name, alerts in notify.items():
            self.notifier.submit(alertmanager_payload(rule_name, alerts, self.external_url))
        return changes

    def states(self) -> list[dict[str, Any]]:
        """Every rule's state now: the worst of its alerts' (firing, pending, resolved), else inactive."""
        with self._lock:
            return [
                {"object": "alert_state", "rule": name, "severity": e.rule.severity, **_state(self._public(e))}
                for name, e in self._rules.items()
            ]

    def test_fire(self, name: str) -> dict[str, Any]:
        """Send a firing notification for the rule to every receiver now, once: what each answered."""
        with self._lock:
            rule = self._entry(name).rule
        labels = {**rule.labels, "alertname": rule.name, "severity": rule.severity, "test": "true"}
        alert = Alert(rule.name, labels, dict(rule.annotations), State.FIRING, None, time.time(), time.time())
        if not self.notifier.receivers:
            raise InvalidRequestError(
                "no receiver is configured (alert_webhook_urls, alert_smtp_host)", code="no_alert_receivers"
            )
        payload = alertmanager_payload(rule.name, [alert], self.external_url)
        return {"object": "alert_test", "rule": name, "receivers": self.notifier.deliver_once(payload)}

    @property
    def external_url(self) -> str:
        return self.settings.alert_external_url or f"http://{self.settings.host}:{self.settings.port}"

    # -- background thread ---------------------------------------------------------------------
    def start(self) -> None:
        self.notifier.start()
        if self.interval_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="alert-evaluator", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None
        self.notifier.stop()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception:  # one failed evaluation (a database hiccup) must not end alerting
                log.exception("alert evaluation failed")


def _state(public: dict[str, Any]) -> dict[str, Any]:
    return {"state": public["state"], "alerts": public["alerts"]}


def _worst(alerts: list[Alert]) -> str:
    for state in (State.FIRING, State.PENDING, State.RESOLVED):
        if any(a.state is state for a in alerts):
            return state.value
    return State.INACTIVE.value


def receivers(settings: Settings) -> list[Receiver]:
    out: list[Receiver] = [
        WebhookReceiver(url.get_secret_value(), settings.alert_webhook_timeout_s) for url in settings.alert_webhook_urls
    ]
    if settings.alert_smtp_host:
        if not settings.alert_email_to:
            raise InvalidRequestError("alert_smtp_host is set but alert_email_to names no one", param="alert_email_to")
        password = settings.alert_smtp_password.get_secret_value() if settings.alert_smtp_password else None
        smtp = SmtpSettings(
            host=settings.alert_smtp_host,
            port=settings.alert_smtp_port,
            sender=settings.alert_email_from or f"llmos@{settings.alert_smtp_host}",
            recipients=tuple(settings.alert_email_to),
            username=settings.alert_smtp_username,
            password=password,
            starttls=settings.alert_smtp_starttls,
        )
        out.append(EmailReceiver(smtp))
    return out
