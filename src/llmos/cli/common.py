"""Shared CLI pieces: settings from flags, the platform, a rich progress bar, the HTTP client."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from llmos.config import Settings
from llmos.errors import LLMOSError
from llmos.platform import Platform
from llmos.registry.sources import Progress as PullProgress

console = Console()
err_console = Console(stderr=True)


def settings_from(**overrides: Any) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def open_platform(**overrides: Any) -> Platform:
    return Platform.open(settings_from(**overrides))


def fail(exc: LLMOSError) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {exc.message}")
    return typer.Exit(code=1)


class RichPullProgress(PullProgress):
    """Draws each pull stage as a bar (bytes when the size is known, a spinner-like line otherwise)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._task: Any = None

    def stage(self, description: str, total: int | None = None) -> None:
        if self._task is not None:
            task = self._progress.tasks[self._task]
            self._progress.update(self._task, completed=task.total or 1, total=task.total or 1)
        self._task = self._progress.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, amount)

    def finish(self) -> None:
        self.stage("done", total=1)
        self.advance(1)


def pull_with_progress(platform: Platform, ref: str, name: str | None = None) -> Any:
    return run_with_progress(lambda reporter: platform.registry.pull(ref, name=name, progress=reporter))


def run_with_progress(work: Callable[[PullProgress], Any]) -> Any:
    """Run registry work that reports progress (a pull, an export), its stages drawn as bars."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        reporter = RichPullProgress(bar)
        result = work(reporter)
        reporter.finish()
    return result


def api_client(settings: Settings, api_key: str | None) -> Any:
    from openai import OpenAI

    key = api_key or os.environ.get("LLMOS_API_KEY") or (settings.admin_key and settings.admin_key.get_secret_value())
    if not key:
        err_console.print("[red]error:[/red] no API key: pass --api-key or set LLMOS_API_KEY")
        raise typer.Exit(code=1)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104
    return OpenAI(base_url=f"http://{host}:{settings.port}/v1", api_key=key)


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"
