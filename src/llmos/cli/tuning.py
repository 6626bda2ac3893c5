"""`llmos files`, `llmos finetune create --follow` and `llmos jobs ...`: clients of a running server."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmos.cli.client_cmds import HostOpt, KeyOpt, PortOpt
from llmos.cli.common import api_client, console, err_console, settings_from
from llmos.errors import InvalidRequestError
from llmos.kernel.job_status import TERMINAL, JobStatus
from llmos.training.spec import METHODS, parse_spec

files_app = typer.Typer(help="Upload and list files (training data, batch input).", no_args_is_help=True)
finetune_app = typer.Typer(help="Start fine-tuning jobs.", no_args_is_help=True)
jobs_app = typer.Typer(help="Follow and control fine-tuning jobs.", no_args_is_help=True)


def client_for(api_key: str | None, host: str | None, port: int | None) -> Any:
    return api_client(settings_from(host=host, port=port), api_key)


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    import openai

    try:
        return fn(*args, **kwargs)
    except openai.APIError as exc:
        err_console.print(f"[red]error:[/red] {escape(api_error_text(exc))}")
        raise typer.Exit(code=1) from exc


def api_error_text(exc: Any) -> str:
    """The server's OpenAI-shaped error as one line: its message, then the field it names and its code."""
    body = getattr(exc, "body", None)
    if not (isinstance(body, dict) and isinstance(body.get("message"), str)):
        return str(exc)
    named = [f"{k} {body[k]}" for k in ("param", "code") if body.get(k)]
    return f"{body['message']} ({', '.join(named)})" if named else body["message"]


def file_id(client: Any, value: str, purpose: str = "fine-tune") -> str:
    """``value`` if it is a file id; else the id of the local file ``value`` uploaded for ``purpose``."""
    if value.startswith("file-") and not Path(value).exists():
        return value
    with Path(value).open("rb") as f:
        return str(call(client.files.create, file=f, purpose=purpose).id)


@files_app.command("upload")
def upload(
    path: Path,
    purpose: Annotated[str, typer.Option(help="fine-tune, batch or pretrain (a raw text corpus).")] = "fine-tune",
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Upload a file; prints its id, status and what validation found."""
    client = client_for(api_key, host, port)
    with path.open("rb") as f:
        created = call(client.files.create, file=f, purpose=purpose)
    console.print_json(json.dumps(created.model_dump()))


@files_app.command("list")
def list_files(api_key: KeyOpt = None, host: HostOpt = None, port: PortOpt = None) -> None:
    """Your tenant's files."""
    table = Table("id", "filename", "purpose", "bytes", "status", "format", "records")
    for f in call(client_for(api_key, host, port).files.list).data:
        extra = f.model_dump()
        table.add_row(
            f.id,
            f.filename,
            f.purpose,
            str(f.bytes),
            f.status,
            str(extra.get("format", "-")),
            str(extra.get("records", "-")),
        )
    console.print(table)


@finetune_app.command("create")
def create(
    model: Annotated[str, typer.Option(help="Base model.")],
    training_file: Annotated[str, typer.Option(help="A file id, or a local path to upload first.")],
    validation_file: Annotated[str | None, typer.Option(help="A file id or local path.")] = None,
    suffix: Annotated[str | None, typer.Option(help="Part of the fine-tuned model's name.")] = None,
    epochs: Annotated[int | None, typer.Option(help="n_epochs (default auto).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="batch_size (default auto).")] = None,
    lr_multiplier: Annotated[float | None, typer.Option(help="learning_rate_multiplier.")] = None,
    adapter: Annotated[str, typer.Option(help="lora, adalora, ia3, prefix_tuning, prompt_tuning or full.")] = "lora",
    method: Annotated[
        str, typer.Option(help="supervised (chat or task lines) or dpo (preference lines; see docs/fine-tuning.md).")
    ] = "supervised",
    beta: Annotated[
        float | None, typer.Option(help="DPO's beta, 0.001 to 10 (default 0.1): higher stays nearer the base.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for a reproducible run.")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Show progress and metrics until the job ends.")] = False,
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Create a fine-tuning job, supervised or DPO (uploading local files first)."""
    hyper = {"n_epochs": epochs, "batch_size": batch_size, "learning_rate_multiplier": lr_multiplier, "beta": beta}
    checked = method_body(method, adapter, {k: v for k, v in hyper.items() if v is not None})
    client = client_for(api_key, host, port)
    body: dict[str, Any] = {"model": model, "training_file": file_id(client, training_file), "method": checked}
    if validation_file:
        body["validation_file"] = file_id(client, validation_file)
    if suffix:
        body["suffix"] = suffix
    if seed is not None:
        body["seed"] = seed
    job = call(client.post, "/fine_tuning/jobs", body=body, cast_to=dict)
    console.print(f"created job [bold]{job['id']}[/bold] ({job['status']})")
    if follow:
        follow_progress(client, job["id"])


OPTIONS = {
    "hyperparameters.n_epochs": "--epochs",
    "hyperparameters.batch_size": "--batch-size",
    "hyperparameters.learning_rate_multiplier": "--lr-multiplier",
    "hyperparameters.beta": "--beta",
    "adapter.type": "--adapter",
}
"""The option behind each field of ``method`` that ``finetune create`` writes, for its errors."""


def method_body(method: str, adapter: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's ``method`` for ``finetune create``, checked by the server's own rules (training/spec.py)
    before anything is uploaded, so a bad option costs no upload and names the option."""
    if "beta" in hyperparameters and method != "dpo":
        raise typer.BadParameter("applies to --method dpo only", param_hint="--beta")
    body = {"type": method, method: {"hyperparameters": hyperparameters, "adapter": {"type": adapter}}}
    if method not in METHODS:  # parse_spec's message would also offer pretrain, which is `llmos pretrain`
        raise typer.BadParameter(f"must be one of {', '.join(METHODS)}", param_hint="--method")
    try:
        parse_spec(body, None, training_records=1)
    except InvalidRequestError as exc:
        field = (exc.param or "").removeprefix(f"method.{method}.")
        raise typer.BadParameter(exc.message, param_hint=OPTIONS.get(field, exc.param)) from exc
    return body


LOSS_CURVE_POINTS = 48
_BARS = "▁▂▃▄▅▆▇█"


def loss_curve(losses: list[float], width: int = LOSS_CURVE_POINTS) -> str:
    """The last ``width`` training losses as a one-line chart, lowest to highest over their own range."""
    shown = losses[-width:]
    if not shown:
        return ""
    low, high = min(shown), max(shown)
    span = (high - low) or 1.0
    bars = "".join(_BARS[round((v - low) / span * (len(_BARS) - 1))] for v in shown)
    return f"{bars} {high:.3f}..{low:.3f}"


TRAINING_SHOWN = ("train_loss", "train_mean_token_accuracy", "train_accuracy", "train_preference_accuracy")
"""What a training report shows beside the bar: the loss and the task's accuracy (DPO's share of
pairs ranked right)."""


def training_line(data: dict[str, Any]) -> str:
    return ", ".join(f"{k}={data[k]:.3f}" for k in TRAINING_SHOWN if isinstance(data.get(k), int | float))


def validation_line(data: dict[str, Any]) -> str:
    """A validation report in words, in the order the task wrote it: ``validation, epoch 2: loss
    0.612, preference accuracy 0.750, reward margin 0.210, ...`` for DPO."""
    shown = ", ".join(
        f"{k.removeprefix('valid_').replace('_', ' ')} {v:.3f}"
        for k, v in data.items()
        if k.startswith("valid_") and isinstance(v, int | float) and not isinstance(v, bool)
    )
    return f"validation, epoch {data.get('epoch', '?')}: {shown or json.dumps(data)}"


def follow_progress(client: Any, job_id: str) -> None:
    """Events and a progress bar until the job ends, with the training loss drawn as it falls."""
    seen: set[str] = set()
    losses: list[float] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}"),
    )
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job_id, total=None, metrics="")
        while True:
            job = call(client.fine_tuning.jobs.retrieve, job_id)
            events = list(reversed(call(client.fine_tuning.jobs.list_events, job_id, limit=100).data))
            for e in events:
                if e.id in seen:
                    continue
                seen.add(e.id)
                data = e.data or {}
                if e.type == "metrics" and "total_steps" in data:
                    shown = training_line(data)
                    if isinstance(data.get("train_loss"), int | float):
                        losses.append(float(data["train_loss"]))
                        shown = f"{shown}  {loss_curve(losses)}"
                    bar.update(task, total=data["total_steps"], completed=data["step"], metrics=shown)
                elif e.type == "metrics":
                    bar.console.print(f"  {escape(validation_line(data))}")
                else:
                    bar.console.print(f"  {e.message}")
            bar.update(task, description=f"{job_id} {job.status}")
            if job.status in TERMINAL:
                break
            time.sleep(1.0)
    if job.status == JobStatus.SUCCEEDED:
        console.print(f"[green]succeeded[/green]: {job.fine_tuned_model}")
    else:
        console.print(f"[red]{job.status}[/red]: {job.error}")
        raise typer.Exit(code=1)


@jobs_app.command("list")
def list_jobs(api_key: KeyOpt = None, host: HostOpt = None, port: PortOpt = None) -> None:
    """Your tenant's jobs, newest first."""
    table = Table("id", "model", "status", "fine_tuned_model", "trained tokens")
    for j in call(client_for(api_key, host, port).fine_tuning.jobs.list).data:
        table.add_row(j.id, j.model, j.status, j.fine_tuned_model or "-", str(j.trained_tokens or "-"))
    console.print(table)


@jobs_app.command("show")
def show(job_id: str, api_key: KeyOpt = None, host: HostOpt = None, port: PortOpt = None) -> None:
    """A job as JSON, with its checkpoints and their metrics."""
    client = client_for(api_key, host, port)
    job = call(client.fine_tuning.jobs.retrieve, job_id).model_dump()
    job["checkpoints"] = [c.model_dump() for c in call(client.fine_tuning.jobs.checkpoints.list, job_id).data]
    console.print_json(json.dumps(job, default=str))


@jobs_app.command("events")
def events(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", help="Until the job ends.")] = False,
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """A job's events, oldest first."""
    client = client_for(api_key, host, port)
    if follow:
        follow_progress(client, job_id)
        return
    for e in reversed(call(client.fine_tuning.jobs.list_events, job_id, limit=1000).data):
        console.print(f"{time.strftime('%H:%M:%S', time.gmtime(e.created_at))} {e.type:8} {e.message}")


def _control(action: str) -> Any:
    def command(job_id: str, api_key: KeyOpt = None, host: HostOpt = None, port: PortOpt = None) -> None:
        job = call(getattr(client_for(api_key, host, port).fine_tuning.jobs, action), job_id)
        console.print(f"{job.id}: {job.status}")

    command.__doc__ = f"{action.capitalize()} a job."
    return command


for _action in ("cancel", "pause", "resume"):
    jobs_app.command(_action)(_control(_action))
