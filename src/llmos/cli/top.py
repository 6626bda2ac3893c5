"""`llmos top`: a live terminal view of a running server, read from its /metrics.

Each refresh scrapes /metrics (and, with an admin key, the firing alerts at /v1/admin/alerts),
parses it with prometheus_client's parser, and draws resident models (batch, queue, cache use,
adapters, memory, tokens/s since the previous scrape), running fine-tuning jobs and firing alerts.
Parsing and drawing are pure functions of the scraped text, so a frame is tested without a server.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Annotated, Any

import typer
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from llmos.cli.common import human_size, settings_from

MODEL_GAUGES = {
    "llmos_num_requests_running": "running",
    "llmos_num_requests_waiting": "waiting",
    "llmos_batch_current_size": "batch",
    "llmos_kv_cache_usage_perc": "kv",
    "llmos_lora_adapters_loaded": "adapters",
    "llmos_model_memory_bytes": "memory",
}
JOB_GAUGES = {
    "llmos_training_loss": "loss",
    "llmos_training_accuracy": "accuracy",
    "llmos_training_tokens_per_second": "tokens_per_second",
}


@dataclass
class Snapshot:
    """What one scrape says."""

    taken: float
    models: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    generated: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    """Cumulative generated tokens per model (tokens/s come from two snapshots)."""
    jobs: dict[str, dict[str, float]] = field(default_factory=lambda: defaultdict(dict))
    job_counts: dict[str, float] = field(default_factory=dict)
    engine_restarts: float = 0.0


def parse(text: str, taken: float) -> Snapshot:
    snap = Snapshot(taken)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name in MODEL_GAUGES:
                snap.models[labels["model_name"]][MODEL_GAUGES[name]] = value
            elif name == "llmos_generation_tokens_total":
                snap.generated[labels["model_name"]] += value
            elif name in JOB_GAUGES:
                snap.jobs[labels["job_id"]][JOB_GAUGES[name]] = value
            elif name == "llmos_fine_tuning_jobs":
                snap.job_counts[labels["status"]] = value
            elif name == "llmos_engine_restarts":
                snap.engine_restarts = value
    return snap


def tokens_per_second(now: Snapshot, before: Snapshot | None) -> dict[str, float]:
    """Generated tokens a second per model between two scrapes (none before the second)."""
    if before is None or now.taken <= before.taken:
        return {}
    elapsed = now.taken - before.taken
    return {m: max(0.0, total - before.generated.get(m, 0.0)) / elapsed for m, total in now.generated.items()}


def render(now: Snapshot, before: Snapshot | None, alerts: list[dict[str, Any]] | None, source: str) -> RenderableType:
    """One frame: models, jobs, alerts."""
    rates = tokens_per_second(now, before)
    models = Table(title="Resident models", expand=True)
    for column in ("model", "running", "waiting", "batch", "tokens/s", "KV cache", "adapters", "memory"):
        models.add_column(column, justify="left" if column == "model" else "right")
    for name in sorted(now.models):
        m = now.models[name]
        rate = rates.get(name)
        models.add_row(
            name,
            f"{m.get('running', 0):.0f}",
            f"{m.get('waiting', 0):.0f}",
            f"{m.get('batch', 0):.0f}",
            "-" if rate is None else f"{rate:.1f}",
            f"{100 * m.get('kv', 0):.1f}%",
            f"{m.get('adapters', 0):.0f}",
            human_size(int(m["memory"])) if "memory" in m else "-",
        )
    if not now.models:
        models.add_row("(none resident)", *[""] * 7)

    jobs = Table(title="Fine-tuning jobs", expand=True)
    for column in ("job", "loss", "accuracy", "tokens/s"):
        jobs.add_column(column, justify="left" if column == "job" else "right")
    for job_id in sorted(now.jobs):
        j = now.jobs[job_id]
        jobs.add_row(
            job_id,
            f"{j['loss']:.4f}" if "loss" in j else "-",
            f"{100 * j['accuracy']:.1f}%" if "accuracy" in j else "-",
            f"{j['tokens_per_second']:.0f}" if "tokens_per_second" in j else "-",
        )
    counts = ", ".join(f"{status} {count:.0f}" for status, count in sorted(now.job_counts.items()) if count)

    if alerts is None:
        alert_line = Text("alerts: not readable with this key (needs admin)", style="dim")
    else:
        firing = [a for a in alerts if a.get("state") == "firing"]
        alert_line = Text(
            "firing alerts: " + (", ".join(f"{a['rule']} ({a.get('severity', '?')})" for a in firing) or "none"),
            style="bold red" if firing else "green",
        )
    header = Text(f"LLM OS at {source}   engine restarts: {now.engine_restarts:.0f}   jobs: {counts or 'none'}")
    return Group(header, models, jobs, alert_line)


def _fetch(client: Any, url: str) -> tuple[Snapshot, list[dict[str, Any]] | None]:
    resp = client.get(f"{url}/metrics")
    resp.raise_for_status()
    snap = parse(resp.text, time.monotonic())
    alerts_resp = client.get(f"{url}/v1/admin/alerts")
    alerts = alerts_resp.json().get("data", []) if alerts_resp.status_code == 200 else None
    return snap, alerts


def top(
    url: Annotated[str | None, typer.Option(help="Server URL (default: http://LLMOS_HOST:LLMOS_PORT).")] = None,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="A key with the metrics scope (or LLMOS_API_KEY).")
    ] = None,
    interval: Annotated[float, typer.Option(min=0.2, help="Seconds between refreshes.")] = 2.0,
    once: Annotated[bool, typer.Option(help="Print one frame and exit.")] = False,
) -> None:
    """A live view of a running server: resident models, batches, queues, tokens/s, KV cache use,
    running fine-tuning jobs and firing alerts. Ctrl-C quits."""
    import os

    import httpx
    from rich.live import Live

    from llmos.cli.common import console, err_console

    settings = settings_from()
    if url is None:
        host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host  # noqa: S104
        url = f"http://{host}:{settings.port}"
    key = api_key or os.environ.get("LLMOS_API_KEY") or (settings.admin_key and settings.admin_key.get_secret_value())
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = url.rstrip("/")
    with httpx.Client(headers=headers, timeout=10) as client:
        try:
            before: Snapshot | None = None
            now, alerts = _fetch(client, url)
            if once:
                console.print(render(now, None, alerts, url))
                return
            with Live(render(now, None, alerts, url), console=console, refresh_per_second=4) as live:
                while True:
                    time.sleep(interval)
                    before, (now, alerts) = now, _fetch(client, url)
                    live.update(render(now, before, alerts, url))
        except httpx.HTTPStatusError as exc:
            err_console.print(
                f"[red]error:[/red] {url}/metrics answered {exc.response.status_code}: {exc.response.text}"
            )
            raise typer.Exit(code=1) from exc
        except httpx.HTTPError as exc:
            err_console.print(f"[red]error:[/red] cannot reach {url}: {exc}")
            raise typer.Exit(code=1) from exc
        except KeyboardInterrupt:
            return
