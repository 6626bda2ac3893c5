"""Alert states, as Prometheus moves them: a group whose condition holds is pending, and firing
once it has held for the rule's ``for``; a pending alert whose condition stops holding goes back
to inactive, a firing one is resolved (and kept a while, to be listed and notified). Time is
passed in, never read here, so a test drives the states through any span at once."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from llmos.monitoring.alerts.functions import GroupValues
from llmos.monitoring.alerts.rules import Rule, compare
from llmos.monitoring.alerts.template import render
from llmos.monitoring.alerts.window import Labels


class State(StrEnum):
    INACTIVE = "inactive"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass
class Alert:
    """One label group of one rule whose condition holds or held lately."""

    rule: str
    labels: dict[str, str]
    annotations: dict[str, str]
    state: State
    value: float | None
    active_at: float
    """When the condition started holding (pending since)."""
    fired_at: float | None = None
    resolved_at: float | None = None

    @property
    def fingerprint(self) -> str:
        """Identifies the alert across evaluations and notifications: a hash of its labels."""
        encoded = json.dumps(sorted(self.labels.items())).encode()
        return hashlib.sha256(encoded).hexdigest()[:16]

    def public(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "state": self.state.value, "fingerprint": self.fingerprint}


@dataclass(frozen=True)
class Transition:
    alert: Alert
    """A copy of the alert as it is after the change."""
    previous: State
    at: float


class Evaluator:
    """The alerts of every rule; ``apply`` moves one rule's alerts given its values now."""

    def __init__(self, resolved_retention_s: float = 900.0) -> None:
        self.resolved_retention_s = resolved_retention_s
        self._alerts: dict[str, dict[Labels, Alert]] = {}

    def apply(self, rule: Rule, values: GroupValues, now: float) -> list[Transition]:
        alerts = self._alerts.setdefault(rule.name, {})
        holding = {group: v for group, v in values.items() if compare(rule.op, v, rule.threshold)}
        changes: list[Transition] = []

        def move(alert: Alert, state: State) -> None:
            previous, alert.state = alert.state, state
            changes.append(Transition(dataclasses.replace(alert), previous, now))

        for group, value in holding.items():
            alert = alerts.get(group)
            if alert is None or alert.state is State.RESOLVED:
                alert = alerts[group] = _new_alert(rule, group, now)
            alert.value = value
            alert.annotations = {k: render(v, value, alert.labels) for k, v in rule.annotations.items()}
            if alert.state is State.INACTIVE:
                move(alert, State.PENDING)
            if alert.state is State.PENDING and now - alert.active_at >= rule.for_:
                alert.fired_at = now
                move(alert, State.FIRING)
        for group, alert in list(alerts.items()):
            if group in holding:
                continue
            if alert.state is State.PENDING:
                del alerts[group]
                move(alert, State.INACTIVE)
            elif alert.state is State.FIRING:
                alert.resolved_at = now
                move(alert, State.RESOLVED)
            elif alert.resolved_at is not None and now - alert.resolved_at > self.resolved_retention_s:
                del alerts[group]
        return changes

    def forget(self, rule: str) -> None:
        """A deleted or changed rule starts over (its alerts go without a notification)."""
        self._alerts.pop(rule, None)

    def alerts(self, rule: str) -> list[Alert]:
        return [dataclasses.replace(a) for a in self._alerts.get(rule, {}).values()]


def _new_alert(rule: Rule, group: Labels, now: float) -> Alert:
    own = {k: render(v, None, dict(group)) for k, v in rule.labels.items()}
    labels = {**dict(group), **own, "alertname": rule.name, "severity": rule.severity}
    return Alert(rule=rule.name, labels=labels, annotations={}, state=State.INACTIVE, value=None, active_at=now)
