"""/v1/evals (scope `inference`): OpenAI's Evals API. Evals (create, list, retrieve, update,
delete), their runs (create, list, retrieve, cancel, delete) and each run's output items,
isolated per tenant; natively, a run's task metrics and the comparison of two runs."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from llmos.api.context import limited
from llmos.api.deps import PlatformDep
from llmos.api.openai.batches.lines import CHAT, parse_body
from llmos.api.openai.chat.stored import json_object, page
from llmos.api.openai.evals.runner import EngineModels, EvalRunner
from llmos.errors import InvalidRequestError, LLMOSError, NotFoundError
from llmos.evals.compare import compare_runs
from llmos.evals.criteria import check_references
from llmos.evals.data import RunData, parse_run_source
from llmos.evals.grading import namespaces_of
from llmos.evals.perplexity import perplexity
from llmos.evals.runs import Run, RunStore
from llmos.evals.store import Eval, EvalStore
from llmos.evals.task_metrics import run_report
from llmos.evals.templates import render
from llmos.platform import Platform
from llmos.registry.metadata import check_metadata
from llmos.registry.records import ModelRecord
from llmos.security import ApiKeyInfo

router = APIRouter(prefix="/v1/evals", tags=["evals"])
EvalKey = Annotated[ApiKeyInfo, Depends(limited("inference"))]
Limit = Annotated[int, Query(ge=1, le=100)]
Cursor = Annotated[str | None, Query(max_length=128)]
_EVAL_FIELDS = {"name", "data_source_config", "testing_criteria", "metadata"}
_UPDATE_FIELDS = {"name", "metadata"}
_RUN_FIELDS = {"name", "data_source", "metadata"}


def _audit(request: Request, platform: Platform, key: ApiKeyInfo, action: str, target: str) -> None:
    client = request.client.host if request.client else None
    platform.audit.record(action, tenant=key.tenant, key_id=key.id, target=target, client=client)


def _model_check(platform: Platform, key: ApiKeyInfo) -> Any:
    """``check_model(model, param)``: 404 naming ``param`` for a model the caller may not use."""
    tenant = None if "admin" in key.scopes else key.tenant

    def check(model: str, param: str) -> ModelRecord:
        try:
            return platform.registry.get(model, tenant=tenant)
        except LLMOSError as exc:
            exc.param = param
            raise

    return check


def _runner(request: Request) -> EvalRunner | None:
    runner: EvalRunner | None = request.app.state.eval_runner
    return runner


# -- evals -----------------------------------------------------------------------------------
@router.post("")
async def create_eval(request: Request, platform: PlatformDep, key: EvalKey) -> dict[str, Any]:
    """Check the data source config, every grader, its templates and its model, then store the eval."""
    body = await json_object(request, _EVAL_FIELDS)
    store = EvalStore(platform.db)
    evaluation = await asyncio.to_thread(store.create, key.tenant, body, _model_check(platform, key))
    _audit(request, platform, key, "eval.create", evaluation.id)
    return evaluation.public()


@router.get("")
async def list_evals(
    platform: PlatformDep,
    key: EvalKey,
    after: Cursor = None,
    limit: Limit = 20,
    order: Literal["asc", "desc"] = "asc",
    order_by: Literal["created_at", "updated_at"] = "created_at",
) -> dict[str, Any]:
    store = EvalStore(platform.db)
    evals, more = await asyncio.to_thread(
        store.page, key.tenant, after=after, limit=limit, order=order, order_by=order_by
    )
    return page([e.public() for e in evals], more)


@router.get("/{eval_id}")
async def retrieve_eval(eval_id: str, platform: PlatformDep, key: EvalKey) -> dict[str, Any]:
    return (await asyncio.to_thread(EvalStore(platform.db).get, key.tenant, eval_id)).public()


@router.post("/{eval_id}")
async def update_eval(eval_id: str, request: Request, platform: PlatformDep, key: EvalKey) -> dict[str, Any]:
    """Rename the eval or replace its metadata."""
    body = await json_object(request, _UPDATE_FIELDS)
    evaluation = await asyncio.to_thread(EvalStore(platform.db).update, key.tenant, eval_id, body)
    _audit(request, platform, key, "eval.update", evaluation.id)
    return evaluation.public()


@router.delete("/{eval_id}")
async def delete_eval(eval_id: str, request: Request, platform: PlatformDep, key: EvalKey) -> dict[str, Any]:
    """Delete the eval, its runs (running ones stop) and their output items."""
    runs, _ = await asyncio.to_thread(
        RunStore(platform.db).page, key.tenant, eval_id, after=None, limit=10**9, order="asc", status=None
    )
    await asyncio.to_thread(EvalStore(platform.db).delete, key.tenant, eval_id)
    runner = _runner(request)
    for run in runs:
        if runner is not None:
            runner.halt(run.id)
    _audit(request, platform, key, "eval.delete", eval_id)
    return {"object": "eval.deleted", "deleted": True, "eval_id": eval_id}


# -- runs ------------------------------------------------------------------------------------
def _check_run(platform: Platform, key: ApiKeyInfo, evaluation: Eval, body: dict[str, Any]) -> RunData:
    """The run's items and generation checked whole: items against the item schema, the model
    the caller may use, the sampling parameters as the chat endpoint checks them."""
    data = parse_run_source(
        body.get("data_source"),
        evaluation.config,
        tenant=key.tenant,
        files=platform.files,
        completions=platform.completions,
        uses_sample=evaluation.reads_sample,
    )
    if data.generation is not None:
        _model_check(platform, key)(data.generation.model, "data_source.model")
        probe = {"model": data.generation.model, "messages": [{"role": "user", "content": "x"}]}
        try:
            parse_body(CHAT, {**probe, **data.generation.sampling})
        except LLMOSError as exc:
            exc.param = f"data_source.sampling_params.{exc.param}" if exc.param else "data_source.sampling_params"
            raise
    return data


@router.post("/{eval_id}/runs")
async def create_run(eval_id: str, request: Request, platform: PlatformDep, key: EvalKey) -> dict[str, Any]:
    """Check the run's data source against the eval, then queue the run (``queued``)."""
    body = await json_object(request, _RUN_FIELDS)
    evaluation = await asyncio.to_thread(EvalStore(platform.db).get, key.tenant, eval_id)
    metadata = check_metadata(body.get("metadata"))
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or len(name) > 512):
        raise InvalidRequestError("name must be a string of at most 512 characters", param="name")
    data = await asyncio.to_thread(_check_run, platform, key, evaluation, body)
    store = RunStore(platform.db)
    run = await asyncio.to_thread(
        store.create,
        evaluation,
        key_id=key.id,
        name=name,
        metadata=metadata,
        data_source=body["data_source"],
        data=data,
    )
    runner = _runner(request)
    if runner is not None:
        runner.submit(run.id)
    _audit(request, platform, key, "eval.run.create", run.id)
    return (await asyncio.to_thread(store.public, [run]))[0]


async def _run(platform: Platform, key: ApiKeyInfo, eval_id: str, run_id: str) -> Run:
    return await asyncio.to_thread(RunStore(platform.db).get, key.tenant, eval_id, run_id)


@router.get("/{eval_id}/runs")
async def list_runs(
    eval_id: str,
    platform: PlatformDep,
    key: EvalKey,
    after: Cursor = None,
    limit: Limit = 20,
    order: Literal["asc", "desc"] = "asc",
    status: Literal["queued", "in_progress", "completed", "canceled", "failed"] | None = None,
) -> dict[str, Any]:
    await asyncio.to_thread(EvalStore(platform.db).get, key.tenant, eval_id)
    store = RunStore(platform.db)

    def listed() -> tuple[list[dict[str, Any]], bool]:
        runs, more = store.page(key.tenant, eval_id, after=after, limit=limit, order=order, status=status)
        return store.public(runs), more

    return page(*await asyncio.to_thread(listed))


@router.get("/{eval_id}/runs/{run_id}")
async def retrieve_run(eval_id: str, run_id: str, platform: PlatformDep, key: EvalKey) -> dict[str, Any]:
    run = await _run(platform, key, eval_id, run_id)
    return (await asyncio.to_thread(RunStore(platform.db).public, [run]))[0]


@router.post("/{eval_id}/runs/{run_id}/cancel")
@router.post("/{eval_id}/runs/{run_id}")
async def cancel_run(
    eval_id: str, run_id: str, request: Request, platform: PlatformDep, key: EvalKey
) -> dict[str, Any]:
    """Stop a queued or running run (``canceled``); the items graded so far stay."""
    store = RunStore(platform.db)
    run = await asyncio.to_thread(store.cancel, key.tenant, eval_id, run_id)
    runner = _runner(request)
    if runner is not None:
        runner.halt(run.id)
    _audit(request, platform, key, "eval.run.cancel", run.id)
    return (await asyncio.to_thread(store.public, [run]))[0]


@router.delete("/{eval_id}/runs/{run_id}")
async def delete_run(
    eval_id: str, run_id: str, request: Request, platform: PlatformDep, key: EvalKey
) -> dict[str, Any]:
    await asyncio.to_thread(RunStore(platform.db).delete, key.tenant, eval_id, run_id)
    runner = _runner(request)
    if runner is not None:
        runner.halt(run_id)
    _audit(request, platform, key, "eval.run.delete", run_id)
    return {"object": "eval.run.deleted", "deleted": True, "run_id": run_id}


@router.get("/{eval_id}/runs/{run_id}/output_items")
async def list_output_items(
    eval_id: str,
    run_id: str,
    platform: PlatformDep,
    key: EvalKey,
    after: Cursor = None,
    limit: Limit = 20,
    order: Literal["asc", "desc"] = "asc",
    status: Literal["pass", "fail", "error"] | None = None,
) -> dict[str, Any]:
    run = await _run(platform, key, eval_id, run_id)
    store = RunStore(platform.db)
    items, more = await asyncio.to_thread(store.output_items, run, after=after, limit=limit, order=order, status=status)
    return page(items, more)


@router.get("/{eval_id}/runs/{run_id}/output_items/{output_item_id}")
async def retrieve_output_item(
    eval_id: str, run_id: str, output_item_id: str, platform: PlatformDep, key: EvalKey
) -> dict[str, Any]:
    run = await _run(platform, key, eval_id, run_id)
    return await asyncio.to_thread(RunStore(platform.db).output_item, run, output_item_id)


@router.get("/{eval_id}/runs/{run_id}/task_metrics")
async def run_task_metrics(
    eval_id: str,
    run_id: str,
    request: Request,
    platform: PlatformDep,
    key: EvalKey,
    task: Literal["classification", "ner", "extractive_qa", "summarization", "translation", "bias", "perplexity"],
    prediction: Annotated[str, Query(max_length=1024)] = "{{sample.output_text}}",
    reference: Annotated[str, Query(min_length=1, max_length=1024)] = "{{item.label}}",
    text: Annotated[str | None, Query(min_length=1, max_length=1024)] = None,
    model: Annotated[str | None, Query(min_length=1, max_length=512)] = None,
) -> dict[str, Any]:
    """Native: a task's metrics over the run's items graded so far (``prediction``, ``reference``
    and, for perplexity, ``text`` are templates; perplexity scores with ``model``, default the run's)."""
    run = await _run(platform, key, eval_id, run_id)
    if task != "perplexity":
        for name, given in (("text", text), ("model", model)):
            if given is not None:
                raise InvalidRequestError(f"{name} is read by task perplexity only", param=name)
    text = text or PERPLEXITY_TEXT
    for template, param in ((prediction, "prediction"), (reference, "reference"), (text, "text")):
        check_references(template, param, None)
    graded = await asyncio.to_thread(RunStore(platform.db).graded_samples, run.id)
    namespaces = [namespaces_of(run.generation, run.items[index], sample) for index, sample in graded]
    if task == "perplexity":
        report = await _perplexity(request, platform, key, model or run.model, [render(text, ns) for ns in namespaces])
    else:  # ROUGE and sacrebleu take the CPU for a while on a large run: off the event loop
        report = await asyncio.to_thread(run_report, task, namespaces, prediction, reference)
    return {"object": "eval.run.task_metrics", "run_id": run.id, **report}


PERPLEXITY_TEXT = "{{item.text}}"
_SCORING_PARAMS = {"echo": "model", "model": "model"}
"""A refusal of the scoring request names the report's field: the model (it cannot score prompts),
else the texts (too long for the model, say)."""


async def _perplexity(
    request: Request, platform: Platform, key: ApiKeyInfo, model: str, texts: list[str]
) -> dict[str, Any]:
    if not model:
        raise InvalidRequestError("the run names no model; give the model to score with", param="model")
    record = await asyncio.to_thread(_model_check(platform, key), model, "model")
    if record.task not in ("chat", "completion"):
        raise InvalidRequestError(
            f"model {model} is a {record.task} model; perplexity needs a causal language model", param="model"
        )
    empty = next((i for i, t in enumerate(texts) if not t.strip()), None)
    if empty is not None:
        raise InvalidRequestError(f"text of item {empty} is empty; perplexity scores a text per item", param="text")
    try:
        return await perplexity(EngineModels(platform, request.app.state.engine, key), model, texts)
    except InvalidRequestError as exc:
        exc.param = _SCORING_PARAMS.get(exc.param or "", "text")
        raise


@router.get("/{eval_id}/compare")
async def compare_eval_runs(
    eval_id: str,
    platform: PlatformDep,
    key: EvalKey,
    run_a: Annotated[str, Query(min_length=1, max_length=128)],
    run_b: Annotated[str, Query(min_length=1, max_length=128)],
) -> dict[str, Any]:
    """Native: two completed runs of the eval over the same items, compared (``evals/compare.py``):
    each run's mean score, the difference ``a - b`` and its paired bootstrap interval, overall and
    per testing criterion."""

    def compared() -> dict[str, Any]:
        evaluation = EvalStore(platform.db).get(key.tenant, eval_id)
        store = RunStore(platform.db)
        runs = []
        for run_id, param in ((run_a, "run_a"), (run_b, "run_b")):
            try:
                runs.append(store.get(key.tenant, eval_id, run_id))
            except NotFoundError as exc:
                raise NotFoundError(exc.message, param=param) from exc
        return compare_runs(store, evaluation, *runs)

    return await asyncio.to_thread(compared)
