"""Notifications in Alertmanager's webhook payload (version 4), so whatever reads Alertmanager's
webhooks (chat bridges, incident tools) reads these unchanged."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from llmos.monitoring.alerts.evaluator import Alert, State

ZERO_TIME = "0001-01-01T00:00:00Z"
"""Alertmanager's ``endsAt`` of an alert still firing."""
RECEIVER = "llmos"


def _rfc3339(at: float | None) -> str:
    if at is None:
        return ZERO_TIME
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _common(maps: Sequence[dict[str, str]]) -> dict[str, str]:
    if not maps:
        return {}
    return {k: v for k, v in maps[0].items() if all(m.get(k) == v for m in maps[1:])}


def rule_url(external_url: str, rule: str) -> str:
    return f"{external_url.rstrip('/')}/v1/admin/alerts/rules/{rule}"


def alertmanager_payload(rule: str, alerts: Sequence[Alert], external_url: str) -> dict[str, Any]:
    """One notification for a rule's alerts that changed together (grouped by ``alertname``)."""
    firing = any(a.state is State.FIRING for a in alerts)
    return {
        "version": "4",
        "groupKey": f'{{}}:{{alertname="{rule}"}}',
        "truncatedAlerts": 0,
        "status": "firing" if firing else "resolved",
        "receiver": RECEIVER,
        "groupLabels": {"alertname": rule},
        "commonLabels": _common([a.labels for a in alerts]),
        "commonAnnotations": _common([a.annotations for a in alerts]),
        "externalURL": external_url,
        "alerts": [
            {
                "status": "firing" if a.state is State.FIRING else "resolved",
                "labels": a.labels,
                "annotations": a.annotations,
                "startsAt": _rfc3339(a.fired_at if a.fired_at is not None else a.active_at),
                "endsAt": _rfc3339(a.resolved_at),
                "generatorURL": rule_url(external_url, rule),
                "fingerprint": a.fingerprint,
            }
            for a in alerts
        ],
    }
