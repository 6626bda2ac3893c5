"""Evals' graders, templates and testing criteria, without a server: string checks, text
similarity, model graders on a scripted model, and criteria refused with the field named."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from llmos.errors import InvalidRequestError
from llmos.evals.criteria import LabelModel, ScoreModel, parse_criteria
from llmos.evals.data import Generation
from llmos.evals.graders import GraderError, cosine, like, read_answer, similarity, string_check
from llmos.evals.grading import grade_item
from llmos.evals.templates import references, render


class ScriptedModels:
    """``Models`` whose chat answers come from a function of the request."""

    def __init__(self, reply: Any) -> None:
        self.reply = reply
        self.requests: list[dict[str, Any]] = []

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(body)
        text = self.reply(body)
        return {
            "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
        }

    async def embed(self, texts: list[str]) -> list[list[float]]:
        return [[1.0, 0.0] if "cat" in t else [0.0, 1.0] for t in texts]


def test_templates_fill_items_and_samples_and_refuse_other_names() -> None:
    ns = {"item": {"q": "2+2?", "answers": ["4", "four"], "meta": {"n": 3}}, "sample": {"output_text": "4"}}
    assert render("Q: {{item.q}} A: {{ sample.output_text }}", ns) == "Q: 2+2? A: 4"
    assert render("{{item.answers.1}} {{item.meta}} [{{item.absent}}]", ns) == 'four {"n": 3} []'
    assert references("{{item.q}} {{sample.output_json.x}}", param="p") == [
        ("item", "q"),
        ("sample", "output_json", "x"),
    ]
    for bad in ("{{ item.q | upper }}", "{{__import__('os')}}", "{{labels.x}}", "{{ }}"):
        with pytest.raises(InvalidRequestError) as err:
            references(bad, param="testing_criteria[0].input")
        assert err.value.param == "testing_criteria[0].input"


@pytest.mark.parametrize(
    ("operation", "text", "reference", "passed"),
    [
        ("eq", "Paris", "Paris", True),
        ("eq", "Paris", "paris", False),
        ("ne", "Paris", "Rome", True),
        ("like", "The capital is Paris.", "%Paris%", True),
        ("like", "The capital is paris.", "%Paris%", False),
        ("ilike", "The capital is paris.", "%PARIS%", True),
        ("like", "cat", "c_t", True),
        ("like", "coat", "c_t", False),
        ("like", "a.b", "a.b", True),
        ("like", "axb", "a.b", False),  # the pattern's '.' is a character, not a regex
    ],
)
def test_string_checks(operation: str, text: str, reference: str, passed: bool) -> None:
    assert string_check(operation, text, reference) is passed


def test_like_matches_across_lines() -> None:
    assert like("first\nsecond", "first%", ignore_case=False)


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_5", "rouge_l"])
def test_similarity_is_one_for_the_same_text_and_lower_for_another(metric: str) -> None:
    same = similarity(metric, "the cat sat on the mat today", "the cat sat on the mat today")
    near = similarity(metric, "the cat sat on the mat now", "the cat sat on the mat today")
    far = similarity(metric, "stock prices fell sharply", "the cat sat on the mat today")
    assert same == pytest.approx(1.0)
    assert far < near < same
    assert far >= 0.0


def test_rouge_orders_count_ngrams_of_their_length() -> None:
    text, reference = "a b c d", "a b x d"
    assert similarity("rouge_1", text, reference) == pytest.approx(0.75)
    assert similarity("rouge_2", text, reference) == pytest.approx(1 / 3)
    assert similarity("rouge_l", text, reference) == pytest.approx(0.75)


def test_cosine() -> None:
    assert cosine([1.0, 0.0], [2.0, 0.0]) == pytest.approx(1.0)
    assert cosine([1.0, 0.0], [0.0, 3.0]) == pytest.approx(0.0)
    assert cosine([0.0, 0.0], [1.0, 1.0]) == 0.0


LABELS = {
    "type": "label_model",
    "name": "judge",
    "model": "judge-model",
    "input": [{"role": "user", "content": "Is {{sample.output_text}} right for {{item.q}}?"}],
    "labels": ["right", "wrong"],
    "passing_labels": ["right"],
}
SCORE = {
    "type": "score_model",
    "name": "score",
    "model": "judge-model",
    "input": [{"role": "system", "content": [{"type": "input_text", "text": "Score {{sample.output_text}}"}]}],
    "range": [1, 5],
    "pass_threshold": 4,
    "sampling_params": {"seed": 3, "max_completions_tokens": 20},
}


def completion(text: str) -> dict[str, Any]:
    return {"model": "m", "choices": [{"message": {"content": text}}]}


def test_model_graders_read_their_json_answers() -> None:
    label, score = parse_criteria([LABELS, SCORE], None)
    assert isinstance(label, LabelModel) and isinstance(score, ScoreModel)
    assert read_answer(label, completion('{"label": "right"}'))[:2] == (1.0, True)
    assert read_answer(label, completion('{"label": "wrong"}'))[:2] == (0.0, False)
    assert read_answer(score, completion('{"result": 4.5}'))[:2] == (4.5, True)
    assert read_answer(score, completion('{"result": 2}'))[:2] == (2.0, False)
    for bad_label in ("right", '{"label": "maybe"}', "[]"):
        with pytest.raises(GraderError):
            read_answer(label, completion(bad_label))
    for bad_score in ('{"result": 9}', '{"result": "4"}', '{"result": true}', '{"x": 1}'):
        with pytest.raises(GraderError):
            read_answer(score, completion(bad_score))


def test_an_item_is_answered_then_graded_by_every_criterion() -> None:
    graders = parse_criteria(
        [
            {
                "type": "string_check",
                "name": "exact",
                "input": "{{sample.output_text}}",
                "reference": "{{item.a}}",
                "operation": "eq",
            },
            LABELS,
            SCORE,
            {
                "type": "text_similarity",
                "name": "near",
                "input": "{{sample.output_text}}",
                "reference": "cat",
                "evaluation_metric": "cosine",
                "pass_threshold": 0.9,
            },
        ],
        frozenset({"q", "a"}),
    )

    def reply(body: dict[str, Any]) -> str:
        fmt = body.get("response_format")
        if fmt is None:
            return "cat"  # the evaluated model's answer
        schema = fmt["json_schema"]["schema"]["properties"]
        return json.dumps({"label": "right"} if "label" in schema else {"result": 3})

    models = ScriptedModels(reply)
    generation = Generation("answerer", template=(parse_criteria([LABELS], None)[0].input[0],), sampling={"seed": 1})
    graded = asyncio.run(grade_item(graders, generation, {"item": {"q": "pet?", "a": "cat"}}, models))
    assert [(r["name"], r["passed"]) for r in graded.results] == [
        ("exact", True),
        ("judge", True),
        ("score", False),
        ("near", True),
    ]
    assert graded.status == "fail" and graded.score == pytest.approx(0.75)
    assert graded.sample["output"] == [{"role": "assistant", "content": "cat"}]
    answer_request, judge_request, score_request = models.requests
    assert answer_request["messages"] == [{"role": "user", "content": "Is  right for pet??"}]  # no sample yet
    assert judge_request["messages"][0]["content"] == "Is cat right for pet??"
    assert judge_request["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"] == [
        "right",
        "wrong",
    ]
    assert (score_request["seed"], score_request["max_completion_tokens"]) == (3, 20)


def test_an_unreadable_grader_answer_errors_the_item() -> None:
    graders = parse_criteria([LABELS], None)
    models = ScriptedModels(lambda body: "no json here")
    graded = asyncio.run(grade_item(graders, None, {"item": {"q": "x"}, "sample": {"output_text": "y"}}, models))
    assert graded.status == "error" and graded.score == 0.0
    assert graded.results[0]["error"]["code"] == "grader_error"


def test_a_bad_item_reference_errors_the_item_without_asking_the_model() -> None:
    models = ScriptedModels(lambda body: "unused")
    generation = Generation("answerer", item_reference="item.q")
    graded = asyncio.run(grade_item(parse_criteria([LABELS], None), generation, {"item": {"q": "text"}}, models))
    assert graded.status == "error" and graded.sample["error"]["code"] == "invalid_item_reference"
    assert models.requests == []


@pytest.mark.parametrize(
    ("criterion", "param"),
    [
        ({"type": "python", "name": "p", "source": "def grade(s, i): return 1"}, "testing_criteria[0].type"),
        ({"type": "multi", "name": "m", "graders": {}, "calculate_output": "1"}, "testing_criteria[0].type"),
        ({"type": "exec", "name": "x"}, "testing_criteria[0].type"),
        (
            {"type": "string_check", "name": "s", "input": "a", "reference": "b", "operation": "regex"},
            "testing_criteria[0].operation",
        ),
        (
            {
                "type": "string_check",
                "name": "s",
                "input": "{{item.q.__class__}}x{{os.system}}",
                "reference": "b",
                "operation": "eq",
            },
            "testing_criteria[0].input",
        ),
        (
            {"type": "string_check", "name": "s", "input": "{{item.nope}}", "reference": "b", "operation": "eq"},
            "testing_criteria[0].input",
        ),
        (
            {"type": "string_check", "name": "s", "input": "a", "reference": "b", "operation": "eq", "x": 1},
            "testing_criteria[0].x",
        ),
        (
            {
                "type": "text_similarity",
                "name": "t",
                "input": "a",
                "reference": "b",
                "evaluation_metric": "meteor",
                "pass_threshold": 0.5,
            },
            "testing_criteria[0].evaluation_metric",
        ),
        (
            {"type": "text_similarity", "name": "t", "input": "a", "reference": "b", "evaluation_metric": "bleu"},
            "testing_criteria[0].pass_threshold",
        ),
        ({**LABELS, "passing_labels": ["great"]}, "testing_criteria[0].passing_labels"),
        (
            {**LABELS, "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
            "testing_criteria[0].input[0].content[0]",
        ),
        ({**LABELS, "input": [{"role": "robot", "content": "hi"}]}, "testing_criteria[0].input[0].role"),
        ({**SCORE, "range": [5, 1]}, "testing_criteria[0].range"),
        ({**SCORE, "pass_threshold": 7}, "testing_criteria[0].pass_threshold"),
        ({**SCORE, "sampling_params": {"temperature": "hot"}}, "testing_criteria[0].sampling_params.temperature"),
        (
            {**SCORE, "sampling_params": {"reasoning_effort": "high"}},
            "testing_criteria[0].sampling_params.reasoning_effort",
        ),
    ],
)
def test_malformed_criteria_are_refused_naming_the_field(criterion: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        parse_criteria([criterion], frozenset({"q"}))
    assert err.value.param == param


def test_criteria_names_are_unique() -> None:
    check = {"type": "string_check", "name": "same", "input": "a", "reference": "b", "operation": "eq"}
    with pytest.raises(InvalidRequestError) as err:
        parse_criteria([check, check], None)
    assert err.value.param == "testing_criteria[1].name"
