"""`llmos eval bias-probe` and `llmos eval cross-validate`: studies made of several API calls, driven
with the official openai client. The bias probe is a shipped eval template run as an ordinary eval
(``evals/bias_probe.py``); cross-validation creates one ordinary fine-tuning job per fold
(``evals/cross_validation.py``)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from llmos.cli.client_cmds import HostOpt, KeyOpt, PortOpt
from llmos.cli.common import api_client, console, err_console, settings_from
from llmos.cli.evals import FINISHED, _api_errors, _json_arg
from llmos.evals import bias_probe as probe
from llmos.evals import cross_validation as cv

CLASSIFIER_TASK = "sequence-classification"
CLASSIFY_BATCH = 32
JOB_FINISHED = ("succeeded", "failed", "cancelled")
SHOWN_LABELS = 4
"""Labels a bias table shows per attribute, the widest gaps first (``--json`` has them all)."""


def _wait_run(client: Any, eval_id: str, run_id: str, poll_s: float) -> Any:
    with console.status(f"{run_id}: running") as status:
        while True:
            run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
            if run.status in FINISHED:
                return run
            status.update(f"{run_id}: {run.status}, {run.result_counts.total} items graded")
            time.sleep(poll_s)


def _classified(client: Any, model: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The probe's items with a classifier's answers as their samples (its label, and every
    label's probability as ``output_json.scores``), for a ``jsonl`` run."""
    out = []
    for start in range(0, len(items), CLASSIFY_BATCH):
        chunk = items[start : start + CLASSIFY_BATCH]
        body = {"model": model, "input": [e["item"]["input"] for e in chunk]}
        answers = client.post("/classifications", body=body, cast_to=dict)["data"]
        for entry, answer in zip(chunk, sorted(answers, key=lambda a: a["index"]), strict=True):
            scores = {s["label"]: s["score"] for s in answer["scores"]}
            sample = {"model": model, "output_text": answer["label"], "output_json": {"scores": scores}}
            out.append({**entry, "sample": sample})
    return out


def bias_probe(
    model: Annotated[str, typer.Argument(help="A chat model (it answers each prompt) or a sequence classifier.")],
    attributes: Annotated[str, typer.Option(help="Comma-separated: name, gender, origin.")] = "name,gender,origin",
    max_tokens: Annotated[int, typer.Option(help="Most tokens per answer of a chat model.")] = 16,
    follow: Annotated[bool, typer.Option(help="Wait for the run and show the gaps.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole report as JSON.")] = False,
    poll_s: Annotated[float, typer.Option(hidden=True)] = 1.0,
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """Run the shipped bias probe: counterfactual pairs that differ only in a name, gender or origin
    term, as an eval and a run; shows each attribute's gaps between the two sides (labels, scores,
    refusals) with their 95% paired bootstrap intervals (task_metrics task=bias)."""
    chosen = [a.strip() for a in attributes.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in probe.TERMS]
    if unknown or not chosen:
        raise typer.BadParameter(f"attributes are {', '.join(probe.TERMS)}", param_hint="--attributes")
    client = api_client(settings_from(host=host, port=port), api_key)
    with _api_errors():
        task = client.get(f"/models/{model}", cast_to=dict)["task"]
        evaluation = client.evals.create(**probe.eval_spec(f"bias probe of {model}"))
        if task == CLASSIFIER_TASK:
            content = _classified(client, model, probe.items(chosen))
            source: dict[str, Any] = {"type": "jsonl", "source": {"type": "file_content", "content": content}}
        else:
            source = probe.chat_data_source(model, chosen, max_tokens=max_tokens)
        run = client.evals.runs.create(evaluation.id, data_source=source, name=f"bias probe of {model}")
        console.print(f"eval {evaluation.id}, run {run.id}")
        if not follow:
            return
        run = _wait_run(client, evaluation.id, run.id, poll_s)
        if run.status != "completed":
            err_console.print(f"[red]error:[/red] run {run.id} is {run.status}")
            raise typer.Exit(code=1)
        report = client.get(
            f"/evals/{evaluation.id}/runs/{run.id}/task_metrics", cast_to=dict, options={"params": {"task": "bias"}}
        )
    if as_json:
        console.print_json(json.dumps(report))
    else:
        _show_bias(report)


def _interval(gap: dict[str, Any] | None) -> str:
    if not gap:
        return "-"
    low, high = gap["interval"]
    marker = " *" if low > 0 or high < 0 else ""
    return f"{gap['gap']:+.3f} [{low:+.3f}, {high:+.3f}]{marker}"


def _show_bias(report: dict[str, Any]) -> None:
    table = Table("attribute", "pairs", "answer changed", "refusal a - b", "score a - b", "label shares a - b")
    for name, gaps in [*report["per_attribute"].items(), ("all", report["overall"])]:
        if not gaps["pairs"]:
            continue
        widest = sorted(gaps["labels"].items(), key=lambda pair: -abs(pair[1]["gap"]))[:SHOWN_LABELS]
        labels = "; ".join(f"{label} {_interval(g)}" for label, g in widest)
        changed = gaps["changed"]
        table.add_row(
            name,
            str(gaps["pairs"]),
            f"{changed['mean_a']:.3f}",
            _interval(gaps["refusal"]),
            _interval(gaps["score"]),
            labels or "-",
        )
    console.print(table)
    console.print("side a: the first term of each pair (docs/evaluation.md); * the 95% interval excludes zero")


def cross_validate(
    training_file: Annotated[Path, typer.Argument(help="A classification file (JSONL text/label, or CSV/TSV).")],
    model: Annotated[str, typer.Option(help="The encoder to fine-tune.")],
    k: Annotated[int, typer.Option("--k", help="Folds.")] = 5,
    seed: Annotated[int, typer.Option(help="Seeds the folds and every job.")] = 0,
    method: Annotated[str | None, typer.Option(help="The jobs' method: JSON or a JSON file.")] = None,
    suffix: Annotated[str, typer.Option(help="The fold models' suffix (each adds -f<fold>).")] = "cv",
    follow: Annotated[bool, typer.Option(help="Wait for the jobs and show the folds' scores.")] = True,
    output: Annotated[Path | None, typer.Option(help="Write the summary here as JSON.")] = None,
    poll_s: Annotated[float, typer.Option(hidden=True)] = 2.0,
    api_key: KeyOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
) -> None:
    """k-fold cross-validation of a classification recipe: folds stratified by label (seeded), one
    fine-tuning job per fold (trained on the other folds, validated on its own), then each fold's
    validation accuracy and macro-F1 and their mean and standard deviation."""
    from llmos.training.classify import load_classification_file

    try:
        examples = load_classification_file(training_file)
        folds = cv.stratified_folds([x.label for x in examples], k, seed=seed)
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        raise typer.BadParameter(f"not a classification file with {k} examples or more: {exc}") from exc
    rows = [
        {"text": x.text, "label": x.label, **({"text_pair": x.text_pair} if x.text_pair is not None else {})}
        for x in examples
    ]
    recipe: dict[str, Any] = {"model": model, "seed": seed, "suffix": suffix}
    if method is not None:
        recipe["method"] = _json_arg(method, "--method")
    tag = f"cv-{uuid.uuid4().hex[:12]}"
    client = api_client(settings_from(host=host, port=port), api_key)
    jobs = []
    with _api_errors():
        for fold in range(k):
            train, valid = cv.fold_files(rows, folds, fold)
            names = (f"{tag}-f{fold}-train.jsonl", f"{tag}-f{fold}-valid.jsonl")
            ids = [
                client.files.create(file=(name, data), purpose="fine-tune").id
                for name, data in zip(names, (train, valid), strict=True)
            ]
            body = cv.fold_job(recipe, training_file=ids[0], validation_file=ids[1], fold=fold, k=k, tag=tag)
            jobs.append(client.fine_tuning.jobs.create(**body).id)
        console.print(f"cross-validation {tag}: jobs {', '.join(jobs)}")
        if not follow:
            return
        results = [_fold_result(client, fold, job_id, poll_s) for fold, job_id in enumerate(jobs)]
    summary = {"cross_validation": tag, "k": k, "seed": seed, **cv.summarize(results)}
    if output is not None:
        output.write_text(json.dumps(summary, indent=2))
    _show_folds(summary)
    if summary["succeeded"] < k:
        raise typer.Exit(code=1)


def _fold_result(client: Any, fold: int, job_id: str, poll_s: float) -> cv.FoldResult:
    with console.status(f"fold {fold}: {job_id}") as status:
        while (job := client.fine_tuning.jobs.retrieve(job_id)).status not in JOB_FINISHED:
            status.update(f"fold {fold}: {job_id} {job.status}")
            time.sleep(poll_s)
    metrics: dict[str, float] = {}
    if job.status == "succeeded" and job.fine_tuned_model:
        extra = client.get(f"/models/{job.fine_tuned_model}", cast_to=dict).get("extra") or {}
        found = extra.get("metrics") or {}
        metrics = {m: float(found[m]) for m in cv.METRICS if isinstance(found.get(m), int | float)}
    return cv.FoldResult(fold, job_id, job.status, job.fine_tuned_model, metrics)


def _show_folds(summary: dict[str, Any]) -> None:
    table = Table("fold", "job", "status", "accuracy", "macro-F1")
    for f in summary["folds"]:
        accuracy, macro = f.get("valid_accuracy"), f.get("valid_macro_f1")
        table.add_row(
            str(f["fold"]),
            f["job_id"],
            f["status"],
            "-" if accuracy is None else f"{accuracy:.4f}",
            "-" if macro is None else f"{macro:.4f}",
        )
    console.print(table)
    for name in ("accuracy", "macro_f1"):
        stat = summary[name]
        if stat["mean"] is not None:
            console.print(f"{name}: {stat['mean']:.4f} ± {stat['std']:.4f} over {summary['succeeded']} folds")
