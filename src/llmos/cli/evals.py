"""`llmos eval create|run|show|compare`: evals on a running server through the official openai
package (docs/api.md's Evals); a thin layer over ``client.evals`` and the native comparison.
``eval_studies.py`` holds the commands that drive several calls (bias probe, cross-validation)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from llmos.cli.client_cmds import HostOpt, KeyOpt, PortOpt
from llmos.cli.common import api_client, console, err_console, settings_from

eval_app = typer.Typer(help="Evals (OpenAI's Evals API): create, run, show results.", no_args_is_help=True)
FINISHED = ("completed", "failed", "canceled")


@contextmanager
def _api_errors() -> Iterator[None]:
    """An API error as one red line and exit code 1, not a traceback."""
    import openai

    try:
        yield
    except openai.APIError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(code=1) from exc


def _json_arg(value: str, what: str) -> Any:
    """A JSON value given inline, or the path of a file holding it."""
    path = Path(value)
    text = path.read_text() if not value.lstrip().startswith(("{", "[")) and path.is_file() else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{what} is neither JSON nor a JSON file: {exc}") from exc


def _source(client: Any, items: str) -> dict[str, Any]:
    """A run's items: a local JSONL file (uploaded with purpose ``evals``) or a file id."""
    if Path(items).is_file():
        with Path(items).open("rb") as f:
            return {"type": "file_id", "id": client.files.create(file=f, purpose="evals").id}
    return {"type": "file_id", "id": items}


@eval_app.command("create")
def create(
    spec: Annotated[str, typer.Argument(help="The eval: JSON or a JSON file (POST /v1/evals's body).")],
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Create an eval; prints its id."""
    client = api_client(settings_from(host=host, port=port), api_key)
    with _api_errors():
        created = client.evals.create(**_json_arg(spec, "SPEC"))
    console.print(created.id)


@eval_app.command("run")
def run(
    eval_id: Annotated[str, typer.Argument(help="The eval.")],
    items: Annotated[str, typer.Argument(help="A JSONL file of {item, sample} lines (uploaded) or a file id.")],
    model: Annotated[str | None, typer.Option(help="A model answers each item first (a completions run).")] = None,
    prompt: Annotated[str, typer.Option(help="The user message sent to --model, a template.")] = "{{item.input}}",
    system: Annotated[str | None, typer.Option(help="A system message before it.")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature of --model.")] = 0.0,
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer of --model.")] = 256,
    name: Annotated[str | None, typer.Option(help="The run's name.")] = None,
    follow: Annotated[bool, typer.Option(help="Wait for the run to end and show its results.")] = False,
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Start a run of an eval over a file's items; prints the run's id (or, with --follow, its results)."""
    client = api_client(settings_from(host=host, port=port), api_key)
    with _api_errors():
        data_source: dict[str, Any] = {"type": "jsonl", "source": _source(client, items)}
        if model is not None:
            template = [{"role": "system", "content": system}] if system else []
            template.append({"role": "user", "content": prompt})
            data_source = {
                "type": "completions",
                "source": data_source["source"],
                "model": model,
                "input_messages": {"type": "template", "template": template},
                "sampling_params": {"temperature": temperature, "max_completion_tokens": max_tokens},
            }
        started = client.evals.runs.create(eval_id, data_source=data_source, **({"name": name} if name else {}))
        if not follow:
            console.print(started.id)
            return
        current = started
        with console.status(f"{started.id}: {started.status}") as status:
            while current.status not in FINISHED:
                time.sleep(1.0)
                current = client.evals.runs.retrieve(started.id, eval_id=eval_id)
                counts = current.result_counts
                status.update(f"{started.id}: {current.status}, {counts.total} items graded")
    _show_run(current)
    if current.status != "completed":
        raise typer.Exit(code=1)


@eval_app.command("show")
def show(
    eval_id: Annotated[str, typer.Argument(help="The eval.")],
    run_id: Annotated[str | None, typer.Argument(help="One of its runs (else: every run).")] = None,
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """An eval's runs with their counts, or one run's results per testing criterion."""
    client = api_client(settings_from(host=host, port=port), api_key)
    with _api_errors():
        if run_id is not None:
            _show_run(client.evals.runs.retrieve(run_id, eval_id=eval_id))
            return
        evaluation = client.evals.retrieve(eval_id)
        runs = list(client.evals.runs.list(eval_id))
    console.print(f"[bold]{evaluation.name}[/bold] ({evaluation.id}): {len(evaluation.testing_criteria)} criteria")
    table = Table("run", "model", "status", "passed", "failed", "errored", "total")
    for r in runs:
        c = r.result_counts
        table.add_row(r.id, r.model, r.status, str(c.passed), str(c.failed), str(c.errored), str(c.total))
    console.print(table)


def _show_run(run: Any) -> None:
    c = run.result_counts
    console.print(
        f"[bold]{run.id}[/bold] ({run.model or '-'}): {run.status}; {c.passed} passed, {c.failed} failed, "
        f"{c.errored} errored of {c.total}"
    )
    if run.error:
        err_console.print(f"[red]error:[/red] {run.error.message}")
    table = Table("testing criterion", "passed", "failed", "pass rate")
    for r in run.per_testing_criteria_results:
        total = r.passed + r.failed
        table.add_row(r.testing_criteria, str(r.passed), str(r.failed), f"{r.passed / total:.3f}" if total else "-")
    console.print(table)


@eval_app.command("compare")
def compare(
    eval_id: Annotated[str, typer.Argument(help="The eval.")],
    run_a: Annotated[str, typer.Argument(help="A completed run (the candidate: a positive difference favours it).")],
    run_b: Annotated[str, typer.Argument(help="A completed run over the same items (the baseline).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the comparison as JSON.")] = False,
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Two runs of an eval compared item by item: each mean, the difference and its paired bootstrap
    95% interval, overall and per testing criterion (GET /v1/evals/{id}/compare)."""
    client = api_client(settings_from(host=host, port=port), api_key)
    with _api_errors():
        result = client.get(
            f"/evals/{eval_id}/compare", cast_to=dict, options={"params": {"run_a": run_a, "run_b": run_b}}
        )
    if as_json:
        console.print_json(json.dumps(result))
        return
    a, b = result["run_a"], result["run_b"]
    console.print(f"a: {a['id']} ({a['model'] or '-'})  b: {b['id']} ({b['model'] or '-'})")
    table = Table("testing criterion", "items", "mean a", "mean b", "a - b", f"{result['confidence']:.0%} interval")
    rows = [("(all criteria)", result["overall"])] + [
        (r["testing_criteria"], r) for r in result["per_testing_criteria"]
    ]
    for name, r in rows:
        if not r["items"]:
            table.add_row(name, "0", "-", "-", "-", "-")
            continue
        low, high = r["interval"]
        marker = " *" if r["excludes_zero"] else ""
        table.add_row(
            name,
            str(r["items"]),
            f"{r['mean_a']:.4f}",
            f"{r['mean_b']:.4f}",
            f"{r['difference']:+.4f}{marker}",
            f"[{low:+.4f}, {high:+.4f}]",
        )
    console.print(table)
    console.print("* the interval excludes zero")
