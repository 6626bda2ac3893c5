"""`llmos tenants create|list|update`, `llmos usage` and `llmos audit`: local administration."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from llmos.cli.common import console, fail, open_platform
from llmos.errors import LLMOSError
from llmos.security.limits import Limits

tenants_app = typer.Typer(help="Create, list and change tenants.", no_args_is_help=True)
HomeOpt = Annotated[str | None, typer.Option("--home", help="Data directory (LLMOS_HOME).")]
LimitsOpt = Annotated[
    str | None, typer.Option(help='JSON limits, e.g. \'{"requests_per_minute": 60, "tokens_per_minute": 20000}\'.')
]


def _limits(raw: str | None) -> Limits | None:
    if raw is None:
        return None
    try:
        return Limits.parse(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"--limits is not JSON: {exc}") from exc


@tenants_app.command("create")
def create(
    tenant_id: str,
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    limits: LimitsOpt = None,
    home: HomeOpt = None,
) -> None:
    """Create a tenant (then give it keys with `llmos keys create --tenant`)."""
    platform = open_platform(home=home)
    try:
        tenant = platform.tenants.create(tenant_id, name=name, limits=_limits(limits))
    except LLMOSError as exc:
        raise fail(exc) from exc
    platform.audit.record("tenant.create", tenant=tenant.id, target=tenant.id, client="cli")
    console.print(f"[green]created[/green] tenant {tenant.id}")


@tenants_app.command("update")
def update(
    tenant_id: str,
    name: Annotated[str | None, typer.Option(help="Display name.")] = None,
    limits: LimitsOpt = None,
    disabled: Annotated[bool | None, typer.Option("--disable/--enable", help="Refuse its keys.")] = None,
    home: HomeOpt = None,
) -> None:
    """Change a tenant's name, limits or state."""
    platform = open_platform(home=home)
    try:
        platform.tenants.update(tenant_id, name=name, limits=_limits(limits), disabled=disabled)
    except LLMOSError as exc:
        raise fail(exc) from exc
    platform.audit.record("tenant.update", tenant=tenant_id, target=tenant_id, client="cli")
    console.print(f"[green]updated[/green] tenant {tenant_id}")


@tenants_app.command("list")
def list_tenants(home: HomeOpt = None) -> None:
    """Tenants and their limits."""
    table = Table("id", "name", "limits", "state")
    for t in open_platform(home=home).tenants.list():
        limits = ", ".join(f"{k}={v}" for k, v in t.limits.as_dict().items() if v is not None) or "unlimited"
        table.add_row(t.id, t.name, limits, "disabled" if t.disabled else "active")
    console.print(table)


def usage(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    since: Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD.")] = None,
    home: HomeOpt = None,
) -> None:
    """Requests, tokens and training CPU-seconds by day, tenant, key, model and kind."""
    table = Table(
        "day", "tenant", "key", "model", "kind", "requests", "prompt tokens", "completion tokens", "CPU seconds"
    )
    for r in open_platform(home=home).usage.query(tenant=tenant, since=since):
        table.add_row(
            r.day,
            r.tenant,
            r.key_id,
            r.model,
            r.kind,
            str(r.requests),
            str(r.prompt_tokens),
            str(r.completion_tokens),
            f"{r.cpu_seconds:.1f}",
        )
    console.print(table)


def audit(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action, e.g. auth.denied.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Most events.")] = 50,
    home: HomeOpt = None,
) -> None:
    """The audit log, newest first."""
    table = Table("id", "time (UTC)", "action", "outcome", "tenant", "key", "target", "client")
    for e in open_platform(home=home).audit.query(tenant=tenant, action=action, limit=limit):
        table.add_row(
            str(e.id),
            e.at.strftime("%Y-%m-%d %H:%M:%S"),
            e.action,
            e.outcome,
            e.tenant or "-",
            e.key_id or "-",
            e.target or "-",
            e.client or "-",
        )
    console.print(table)
