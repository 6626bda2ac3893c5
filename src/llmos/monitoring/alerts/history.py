"""What the alerts keep in the database: the rules written through the API, and every change of an
alert's state, appended (the history ``/v1/admin/alerts/history`` pages through)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete, select

from llmos.errors import NotFoundError
from llmos.monitoring.alerts.evaluator import Transition
from llmos.monitoring.alerts.rules import Rule
from llmos.registry.db import Database
from llmos.registry.tables import AlertEventRow, AlertRuleRow


class RuleTable:
    """Rules created, replaced and deleted through the API."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def all(self) -> list[dict[str, Any]]:
        with self.db.session() as s:
            return [row.spec for row in s.scalars(select(AlertRuleRow).order_by(AlertRuleRow.name))]

    def put(self, rule: Rule) -> None:
        now = datetime.now(UTC)
        with self.db.session() as s:
            row = s.get(AlertRuleRow, rule.name)
            if row is None:
                s.add(AlertRuleRow(name=rule.name, spec=rule.public(), created_at=now, updated_at=now))
            else:
                row.spec, row.updated_at = rule.public(), now

    def delete(self, name: str) -> None:
        with self.db.session() as s:
            if s.execute(delete(AlertRuleRow).where(AlertRuleRow.name == name)).rowcount == 0:  # type: ignore[attr-defined]
                raise NotFoundError(f"no alert rule {name!r} was created through the API", param="name")


class AlertHistory:
    """Every state change of every alert."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, changes: Sequence[Transition]) -> None:
        if not changes:
            return
        with self.db.session() as s:
            s.add_all(
                AlertEventRow(
                    rule=c.alert.rule,
                    fingerprint=c.alert.fingerprint,
                    labels=c.alert.labels,
                    previous=c.previous.value,
                    state=c.alert.state.value,
                    value=c.alert.value,
                    at=datetime.fromtimestamp(c.at, UTC),
                )
                for c in changes
            )

    def query(self, *, rule: str | None, after: int | None, limit: int) -> list[dict[str, Any]]:
        """Newest first; ``after`` is the id of the last event of the previous page."""
        query = select(AlertEventRow).order_by(AlertEventRow.id.desc()).limit(limit)
        if rule is not None:
            query = query.where(AlertEventRow.rule == rule)
        if after is not None:
            query = query.where(AlertEventRow.id < after)
        with self.db.session() as s:
            return [
                {
                    "object": "alert_event",
                    "id": row.id,
                    "rule": row.rule,
                    "fingerprint": row.fingerprint,
                    "labels": row.labels,
                    "previous": row.previous,
                    "state": row.state,
                    "value": row.value,
                    "at": row.at.replace(tzinfo=row.at.tzinfo or UTC).timestamp(),
                }
                for row in s.scalars(query)
            ]
