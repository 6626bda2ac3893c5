"""One item of a run: its sample (a model's answer to the templated prompt, or the sample the
item came with) and every testing criterion's result, as an output item records them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmos.errors import LLMOSError
from llmos.evals.criteria import Grader
from llmos.evals.data import Generation
from llmos.evals.graders import GraderResult, Models, grade
from llmos.evals.templates import MISSING, lookup, render


@dataclass(frozen=True)
class GradedItem:
    status: str
    """``pass`` (every criterion passed), ``fail``, or ``error`` (no sample, or a grader could not judge)."""
    score: float
    """The share of the criteria passed."""
    results: list[dict[str, Any]]
    sample: dict[str, Any]


class SampleError(Exception):
    """The item could not be answered (a bad ``item_reference``, the model refused the request)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def prompt(generation: Generation, item: dict[str, Any]) -> list[dict[str, str]]:
    """The messages the evaluated model is sent for ``item``."""
    if generation.item_reference is None:
        return [{"role": m.role, "content": render(m.content, {"item": item})} for m in generation.template]
    messages = lookup(tuple(generation.item_reference.split(".")), {"item": item})
    if (
        messages is MISSING
        or not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    ):
        raise SampleError("invalid_item_reference", f"{generation.item_reference} is not a list of chat messages")
    return [dict(m) for m in messages]


async def answer(generation: Generation, item: dict[str, Any], models: Models) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``sample`` namespace graders read, the output item's ``sample``) of the model's answer."""
    messages = prompt(generation, item)
    body = {"model": generation.model, "messages": messages, **generation.sampling}
    try:
        completion = await models.chat(body)
    except LLMOSError as exc:
        raise SampleError(exc.code or "model_error", exc.message) from exc
    choice = completion["choices"][0]
    text = str(choice["message"].get("content") or "")
    namespace = {**answer_namespace(completion.get("model"), text), "choices": completion["choices"]}
    usage = completion.get("usage") or {}
    record = {
        "model": completion.get("model"),
        "input": [{"role": m.get("role"), "content": m.get("content")} for m in messages],
        "output": [{"role": "assistant", "content": text}],
        "finish_reason": choice.get("finish_reason"),
        "usage": {
            "prompt_tokens": usage.get("prompt_tokens", 0),
            "completion_tokens": usage.get("completion_tokens", 0),
            "total_tokens": usage.get("total_tokens", 0),
            "cached_tokens": 0,
        },
        "error": None,
        "seed": generation.sampling.get("seed"),
        "temperature": generation.sampling.get("temperature", 1.0),
        "top_p": generation.sampling.get("top_p", 1.0),
        "max_completion_tokens": generation.sampling.get("max_completion_tokens"),
    }
    return namespace, record


def given_sample(sample: dict[str, Any] | None) -> dict[str, Any]:
    """The output item's ``sample`` of an item that came with its sample (nothing was generated)."""
    sample = sample or {}
    text = sample.get("output_text")
    return {
        "model": sample.get("model"),
        "input": [],
        "output": [{"role": "assistant", "content": text}] if isinstance(text, str) else [],
        "finish_reason": None,
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cached_tokens": 0},
        "error": None,
        "seed": None,
        "temperature": None,
        "top_p": None,
        "max_completion_tokens": None,
    }


async def grade_item(
    graders: list[Grader], generation: Generation | None, entry: dict[str, Any], models: Models
) -> GradedItem:
    """Answer the item (when the run names a model) and grade it by every criterion. Errors of
    the item's own (its sample, a grader's reading) make it ``error``; the engine being gone or
    any other failure propagates to the runner."""
    item = entry["item"]
    if generation is None:
        namespace, record = entry.get("sample") or {}, given_sample(entry.get("sample"))
    else:
        try:
            namespace, record = await answer(generation, item, models)
        except SampleError as exc:
            record = {**given_sample(None), "error": {"code": exc.code, "message": exc.message}}
            return GradedItem("error", 0.0, [], record)
    namespaces = {"item": item, "sample": namespace}
    results: list[GraderResult] = []
    for grader in graders:
        try:
            results.append(await grade(grader, namespaces, models))
        except LLMOSError as exc:  # the grader model's request was refused (it was deleted, say)
            results.append(GraderResult(grader.name, grader.type, 0.0, False, error=exc.message))
    passed = sum(r.passed for r in results)
    errored = any(r.error is not None for r in results)
    status = "error" if errored else "pass" if passed == len(results) else "fail"
    return GradedItem(status, passed / len(results), [r.public() for r in results], record)


def namespaces_of(generation: Generation | None, entry: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """The namespaces a graded item was graded in, again: its item and its sample (the one it came
    with, or the model's answer its output item records)."""
    if generation is None:
        return {"item": entry["item"], "sample": entry.get("sample") or {}}
    output = record.get("output") or [{}]
    return {"item": entry["item"], "sample": answer_namespace(record.get("model"), str(output[0].get("content") or ""))}


def answer_namespace(model: Any, text: str) -> dict[str, Any]:
    """``sample`` of a model's answer: ``output_text``, and ``output_json`` when it is a JSON object."""
    sample: dict[str, Any] = {"model": model, "output_text": text}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        return sample
    return {**sample, "output_json": parsed} if isinstance(parsed, dict) else sample
