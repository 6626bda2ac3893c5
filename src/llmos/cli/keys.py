"""`llmos keys create|list|revoke`: local administration of API keys (direct database access)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.table import Table

from llmos.cli.common import console, fail, open_platform
from llmos.errors import LLMOSError

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
HomeOpt = Annotated[str | None, typer.Option("--home", help="Data directory (LLMOS_HOME).")]


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Option(help="What the key is for.")] = "cli",
    scopes: Annotated[
        str, typer.Option(help="Comma-separated: inference, files, fine-tune, models, metrics, admin.")
    ] = "inference",
    tenant: Annotated[str, typer.Option(help="Tenant the key acts for.")] = "default",
    expires_days: Annotated[int | None, typer.Option(help="Days until the key expires.")] = None,
    home: HomeOpt = None,
) -> None:
    """Create a key. It is printed once and stored only as a hash."""
    expires = datetime.now(UTC) + timedelta(days=expires_days) if expires_days else None
    platform = open_platform(home=home)
    try:
        info, key = platform.keys.create(
            name, tenant=tenant, scopes=tuple(s.strip() for s in scopes.split(",") if s.strip()), expires_at=expires
        )
    except LLMOSError as exc:
        raise fail(exc) from exc
    platform.audit.record(
        "key.create", tenant=info.tenant, target=info.id, client="cli", detail={"scopes": list(info.scopes)}
    )
    console.print(f"key id {info.id} ({', '.join(info.scopes)}); store it now, it is not shown again:")
    print(key)


@keys_app.command("list")
def list_keys(home: HomeOpt = None) -> None:
    """Keys with their scopes and state (never the keys themselves)."""
    table = Table("id", "name", "tenant", "scopes", "created", "expires", "state")
    for k in open_platform(home=home).keys.list():
        state = "revoked" if k.revoked_at else "active"
        table.add_row(
            k.id,
            k.name,
            k.tenant,
            ",".join(k.scopes),
            k.created_at.strftime("%Y-%m-%d"),
            k.expires_at.strftime("%Y-%m-%d") if k.expires_at else "-",
            state,
        )
    console.print(table)


@keys_app.command("revoke")
def revoke(key_id: str, home: HomeOpt = None) -> None:
    """Revoke a key at once."""
    platform = open_platform(home=home)
    try:
        info = platform.keys.revoke(key_id)
    except LLMOSError as exc:
        raise fail(exc) from exc
    platform.audit.record("key.revoke", tenant=info.tenant, target=key_id, client="cli")
    console.print(f"[green]revoked[/green] {key_id}")
