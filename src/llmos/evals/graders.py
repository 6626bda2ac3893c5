"""Graders: each testing criterion scores one item's namespaces (``item``, ``sample``).

String checks and text similarity are computed here; ``cosine`` embeds through the platform's
embedding model and the model graders ask a local chat model, both through ``Models`` (the
engine's own paths, given by the runner), constrained to answer JSON their parser reads.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from llmos.evals.criteria import Grader, LabelModel, ScoreModel, StringCheck, TextSimilarity
from llmos.evals.templates import render
from llmos.evals.text_metrics import ROUGE_NAMES, rouge

MODEL_GRADER_MAX_TOKENS = 64
"""Completion tokens a model grader may spend on its JSON answer unless its sampling_params say."""


class Models(Protocol):
    """What graders and samples need from the engine (the runner charges it to the run's key)."""

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """A chat.completion object for a chat completions request body."""
        ...

    async def embed(self, texts: list[str]) -> list[list[float]]:
        """Embeddings of ``texts`` by the evals' embedding model."""
        ...


@dataclass(frozen=True)
class GraderResult:
    """One grader's verdict on one item, as an output item's ``results`` lists it."""

    name: str
    type: str
    score: float
    passed: bool
    sample: dict[str, Any] | None = None
    error: str | None = None

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type,
            "score": self.score,
            "passed": self.passed,
            "sample": self.sample,
        }
        if self.error is not None:
            out["error"] = {"code": "grader_error", "message": self.error}
        return out


class GraderError(Exception):
    """A grader could not judge an item (a model's answer unreadable): the item is ``errored``."""


# -- string checks -------------------------------------------------------------------------
def like(text: str, pattern: str, *, ignore_case: bool) -> bool:
    """SQL's LIKE as OpenAI's string check uses it: ``%`` any run of characters, ``_`` one."""
    wildcards = {"%": ".*", "_": "."}
    regex = "".join(wildcards.get(c, re.escape(c)) for c in pattern)
    return re.fullmatch(regex, text, re.DOTALL | (re.IGNORECASE if ignore_case else 0)) is not None


def string_check(operation: str, text: str, reference: str) -> bool:
    if operation == "eq":
        return text == reference
    if operation == "ne":
        return text != reference
    return like(text, reference, ignore_case=operation == "ilike")


# -- text similarity ------------------------------------------------------------------------
def similarity(metric: str, text: str, reference: str) -> float:
    """``text`` against ``reference`` by ``metric``, in [0, 1]."""
    if metric == "fuzzy_match":
        return difflib.SequenceMatcher(None, text, reference, autojunk=False).ratio()
    if metric == "bleu":
        import sacrebleu

        return min(1.0, sacrebleu.sentence_bleu(text, [reference]).score / 100.0)
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu

        return float(sentence_gleu([reference.split()], text.split()))
    if metric in ROUGE_NAMES:
        return rouge(text, [reference], [metric])[metric]
    raise ValueError(f"unknown text similarity metric {metric!r}")


def cosine(a: list[float], b: list[float]) -> float:
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(x * x for x in b))
    return 0.0 if norm == 0.0 else sum(x * y for x, y in zip(a, b, strict=True)) / norm


# -- model graders ---------------------------------------------------------------------------
def label_schema(labels: tuple[str, ...]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"label": {"type": "string", "enum": list(labels)}},
        "required": ["label"],
        "additionalProperties": False,
    }


def score_schema(low: float, high: float) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"result": {"type": "number", "minimum": low, "maximum": high}},
        "required": ["result"],
        "additionalProperties": False,
    }


def model_request(grader: LabelModel | ScoreModel, namespaces: Mapping[str, Any]) -> dict[str, Any]:
    """The chat request a model grader sends: its messages rendered, its answer held to JSON."""
    if isinstance(grader, LabelModel):
        schema = label_schema(grader.labels)
        sampling: dict[str, Any] = {"temperature": 0}
    else:
        schema = score_schema(*grader.range)
        sampling = {"temperature": 0, **grader.sampling_params}
    max_tokens = sampling.pop("max_completions_tokens", MODEL_GRADER_MAX_TOKENS)
    return {
        "model": grader.model,
        "messages": [{"role": m.role, "content": render(m.content, namespaces)} for m in grader.input],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": grader.type, "schema": schema, "strict": True},
        },
        "max_completion_tokens": max_tokens,
        **sampling,
    }


def read_answer(grader: LabelModel | ScoreModel, completion: Mapping[str, Any]) -> tuple[float, bool, dict[str, Any]]:
    """(score, passed, sample) from a model grader's chat.completion; GraderError when unreadable."""
    text = str(completion["choices"][0]["message"].get("content") or "")
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GraderError(f"{grader.name}: the grader model's answer is not JSON: {text[:200]!r}") from exc
    sample = {"output_text": text, "model": completion.get("model"), "usage": completion.get("usage")}
    if isinstance(grader, LabelModel):
        label = answer.get("label") if isinstance(answer, dict) else None
        if label not in grader.labels:
            raise GraderError(f"{grader.name}: the grader model answered no label of {list(grader.labels)}")
        passed = label in grader.passing_labels
        return float(passed), passed, {**sample, "label": label}
    value = answer.get("result") if isinstance(answer, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise GraderError(f"{grader.name}: the grader model answered no score")
    low, high = grader.range
    if not low <= value <= high:
        raise GraderError(f"{grader.name}: the grader model's score {value} is outside {[low, high]}")
    return float(value), value >= grader.threshold, sample


# -- one grader on one item ------------------------------------------------------------------
async def grade(grader: Grader, namespaces: Mapping[str, Any], models: Models) -> GraderResult:
    """One grader's result; a failure of its own (an unreadable model answer) is an errored result,
    any other error propagates (the engine refused the request: the item errors)."""
    try:
        score, passed, sample = await _score(grader, namespaces, models)
    except GraderError as exc:
        return GraderResult(grader.name, grader.type, 0.0, False, error=str(exc))
    return GraderResult(grader.name, grader.type, score, passed, sample)


async def _score(
    grader: Grader, namespaces: Mapping[str, Any], models: Models
) -> tuple[float, bool, dict[str, Any] | None]:
    if isinstance(grader, StringCheck):
        passed = string_check(grader.operation, render(grader.input, namespaces), render(grader.reference, namespaces))
        return float(passed), passed, None
    if isinstance(grader, TextSimilarity):
        text, reference = render(grader.input, namespaces), render(grader.reference, namespaces)
        if grader.evaluation_metric == "cosine":
            a, b = await models.embed([text, reference])
            score = cosine(a, b)
        else:
            score = similarity(grader.evaluation_metric, text, reference)
        return score, score >= grader.pass_threshold, None
    completion = await models.chat(model_request(grader, namespaces))
    return read_answer(grader, completion)
