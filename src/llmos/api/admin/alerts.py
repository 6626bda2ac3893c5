"""Alerts under /v1/admin/alerts (admin scope): rules (create, list, get, replace, delete,
test-fire), the state of every rule now, and the history of every state change."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request

from llmos.api.deps import AdminKey, PlatformDep
from llmos.monitoring.alerts.rules import RULE_NAME, parse_rule
from llmos.monitoring.alerts.service import AlertService

router = APIRouter(prefix="/v1/admin/alerts", tags=["alerts"])
RuleName = Annotated[str, Path(pattern=RULE_NAME)]
RuleBody = Annotated[dict[str, Any], Body(description="An alert rule, as docs/alerts.md describes it.")]
"""Read by ``parse_rule``, the one check of rules from files and from the API."""


def get_alerts(request: Request) -> AlertService:
    service: AlertService = request.app.state.alerts
    return service


AlertsDep = Annotated[AlertService, Depends(get_alerts)]


def _audit(platform: Any, request: Request, key: Any, action: str, rule: str) -> None:
    client = request.client.host if request.client else None
    platform.audit.record(action, tenant=key.tenant, key_id=key.id, target=rule, client=client)


@router.get("")
async def alert_states(alerts: AlertsDep, _key: AdminKey) -> dict[str, Any]:
    """Every rule's state now (firing, pending, resolved or inactive) and its alerts."""
    return {"object": "list", "data": await asyncio.to_thread(alerts.states)}


@router.get("/history")
async def alert_history(
    alerts: AlertsDep,
    _key: AdminKey,
    rule: Annotated[str | None, Query(max_length=128)] = None,
    after: Annotated[int | None, Query(ge=1, le=2**62, description="Return events older than this id.")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """Every change of an alert's state, newest first (page with ``after``)."""
    data = await asyncio.to_thread(alerts.history.query, rule=rule, after=after, limit=limit)
    return {"object": "list", "data": data, "has_more": len(data) == limit}


@router.get("/rules")
async def list_rules(alerts: AlertsDep, _key: AdminKey) -> dict[str, Any]:
    return {"object": "list", "data": await asyncio.to_thread(alerts.list_rules)}


@router.post("/rules", status_code=201)
async def create_rule(
    body: RuleBody, alerts: AlertsDep, platform: PlatformDep, request: Request, key: AdminKey
) -> dict[str, Any]:
    rule = parse_rule(body)
    public = await asyncio.to_thread(alerts.create_rule, rule)
    _audit(platform, request, key, "alert_rule.create", rule.name)
    return public


@router.get("/rules/{name}")
async def get_rule(name: RuleName, alerts: AlertsDep, _key: AdminKey) -> dict[str, Any]:
    return await asyncio.to_thread(alerts.get_rule, name)


@router.put("/rules/{name}")
async def replace_rule(
    name: RuleName, body: RuleBody, alerts: AlertsDep, platform: PlatformDep, request: Request, key: AdminKey
) -> dict[str, Any]:
    """Replace a rule written through the API (its alerts start over)."""
    public = await asyncio.to_thread(alerts.replace_rule, name, parse_rule(body))
    _audit(platform, request, key, "alert_rule.update", name)
    return public


@router.delete("/rules/{name}")
async def delete_rule(
    name: RuleName, alerts: AlertsDep, platform: PlatformDep, request: Request, key: AdminKey
) -> dict[str, Any]:
    rule = await asyncio.to_thread(alerts.delete_rule, name)
    _audit(platform, request, key, "alert_rule.delete", name)
    return rule


@router.post("/rules/{name}/test")
async def send_test_notification(name: RuleName, alerts: AlertsDep, _key: AdminKey) -> dict[str, Any]:
    """Send a firing notification of this rule (labelled ``test="true"``) to every receiver once."""
    return await asyncio.to_thread(alerts.test_fire, name)
