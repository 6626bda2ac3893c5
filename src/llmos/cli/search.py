"""`llmos search create ... --follow`, `llmos search show|trials|list|cancel`: hyperparameter
searches on a running server, each trial followed with the fine-tuning jobs' own progress view."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from llmos.cli.client_cmds import HostOpt, KeyOpt, PortOpt
from llmos.cli.common import console
from llmos.cli.tuning import call, client_for, file_id, follow_progress

search_app = typer.Typer(help="Hyperparameter searches: trials run as fine-tuning jobs.", no_args_is_help=True)
FINISHED = ("succeeded", "failed", "cancelled")


def _json(value: str, what: str) -> Any:
    """A JSON value given inline, or the path of a file holding it."""
    text = Path(value).read_text() if not value.lstrip().startswith(("{", "[")) and Path(value).is_file() else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{what} is neither JSON nor a JSON file: {exc}") from exc


@search_app.command("create")
def create(
    model: Annotated[str, typer.Option(help="Base model.")],
    training_file: Annotated[str, typer.Option(help="A file id, or a local path to upload first.")],
    validation_file: Annotated[str, typer.Option(help="A file id or local path: trials are compared on it.")],
    space: Annotated[str, typer.Option(help="The search space: JSON, or a JSON file (docs/fine-tuning.md).")],
    method: Annotated[str | None, typer.Option(help="The fixed part of every trial's method, as JSON.")] = None,
    sampler: Annotated[str, typer.Option(help="tpe, random or grid.")] = "tpe",
    pruner: Annotated[str, typer.Option(help="median, successive_halving or none.")] = "median",
    max_trials: Annotated[int | None, typer.Option(help="Trials at most (default 10; a grid's size).")] = None,
    max_wall_seconds: Annotated[int | None, typer.Option(help="Wall time at most, from creation.")] = None,
    parallelism: Annotated[int, typer.Option(help="Trials run at once (within your job limits).")] = 1,
    suffix: Annotated[str | None, typer.Option(help="Part of the trials' model names.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every trial and of the sampler.")] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Follow each trial until the search ends.")] = False,
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Create a search (uploading local files first); trials are fine-tuning jobs of the one recipe."""
    client = client_for(api_key, host, port)
    budget = {k: v for k, v in {"max_trials": max_trials, "max_wall_seconds": max_wall_seconds}.items() if v}
    body: dict[str, Any] = {
        "model": model,
        "training_file": file_id(client, training_file),
        "validation_file": file_id(client, validation_file),
        "search_space": _json(space, "--space"),
        "sampler": {"type": sampler},
        "pruner": {"type": pruner},
        "budget": budget,
        "parallelism": parallelism,
    }
    if method:
        body["method"] = _json(method, "--method")
    body.update({k: v for k, v in {"suffix": suffix, "seed": seed}.items() if v is not None})
    search = call(client.post, "/fine_tuning/searches", body=body, cast_to=dict)
    console.print(f"created search [bold]{search['id']}[/bold] ({search['status']})")
    if follow:
        follow_search(client, search["id"])


def follow_search(client: Any, search_id: str) -> None:
    """Each trial's job followed in turn (its events, progress and loss curve), then the trials
    table and the best trial; exits 1 unless the search succeeded."""
    followed: set[str] = set()
    while True:
        search = call(client.get, f"/fine_tuning/searches/{search_id}", cast_to=dict)
        trials = call(client.get, f"/fine_tuning/searches/{search_id}/trials", cast_to=dict)["data"]
        waiting = [t for t in trials if t["fine_tuning_job_id"] and t["fine_tuning_job_id"] not in followed]
        if waiting:
            trial = waiting[0]
            followed.add(trial["fine_tuning_job_id"])
            console.print(f"[bold]trial {trial['number']}[/bold] {json.dumps(trial['params'])}")
            with contextlib.suppress(typer.Exit):  # a pruned trial's job ends cancelled: the search goes on
                follow_progress(client, trial["fine_tuning_job_id"])
            continue
        if search["status"] in FINISHED:
            break
        time.sleep(1.0)
    _print_trials(trials)
    best = search["best_trial"]
    if search["status"] == "succeeded" and best:
        console.print(f"[green]best[/green]: trial {best['number']} {search['objective']['metric']}={best['value']}")
        console.print(f"  params {json.dumps(best['params'])}\n  model {search['fine_tuned_model']}")
        console.print(f"  result files {', '.join(search['result_files'])}; CPU {search['cpu_seconds']:.0f} s")
        return
    console.print(f"[red]{search['status']}[/red]: {search['error']}")
    raise typer.Exit(code=1)


def _print_trials(trials: list[dict[str, Any]]) -> None:
    names = sorted({name for t in trials for name in t["params"]})
    table = Table("trial", "state", "value", *names, "job")
    for t in trials:
        value = "-" if t["value"] is None else f"{t['value']:.4f}"
        cells = [str(t["params"].get(n, "-")) for n in names]
        table.add_row(str(t["number"]), t["state"], value, *cells, t["fine_tuning_job_id"] or "-")
    console.print(table)


@search_app.command("show")
def show(search_id: str, api_key: KeyOpt = None, host: HostOpt = None, port: PortOpt = None) -> None:
    """A search as JSON: its request as checked, trial counts, best trial and result files."""
    client = client_for(api_key, host, port)
    console.print_json(json.dumps(call(client.get, f"/fine_tuning/searches/{search_id}", cast_to=dict)))


@search_app.command("trials")
def trials(
    search_id: str,
    follow: Annotated[bool, typer.Option("--follow", help="Follow each trial until the search ends.")] = False,
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """A search's trials: point, state, value and job."""
    client = client_for(api_key, host, port)
    if follow:
        follow_search(client, search_id)
        return
    _print_trials(call(client.get, f"/fine_tuning/searches/{search_id}/trials", cast_to=dict)["data"])


@search_app.command("list")
def list_searches(api_key: KeyOpt = None, host: HostOpt = None, port: PortOpt = None) -> None:
    """Your tenant's searches, newest first."""
    table = Table("id", "model", "status", "trials", "best value", "fine_tuned_model")
    for s in call(client_for(api_key, host, port).get, "/fine_tuning/searches", cast_to=dict)["data"]:
        best = s["best_trial"]
        table.add_row(
            s["id"],
            s["model"],
            s["status"],
            str(s["trials"]["total"]),
            str(best["value"]) if best else "-",
            s["fine_tuned_model"] or "-",
        )
    console.print(table)


@search_app.command("cancel")
def cancel(search_id: str, api_key: KeyOpt = None, host: HostOpt = None, port: PortOpt = None) -> None:
    """Cancel a search: its running trials' jobs are cancelled and what completed is kept."""
    search = call(client_for(api_key, host, port).post, f"/fine_tuning/searches/{search_id}/cancel", cast_to=dict)
    console.print(f"{search['id']}: {search['status']}")
