"""A run's task metrics at ``GET /v1/evals/{id}/runs/{run}/task_metrics`` (native, so plain HTTP;
the runs through the official client): NER, translation and summarization over a run's samples,
perplexity of the tiny chat model on the items' texts through the completions endpoint's prompt
scoring (checked against transformers' own forward pass), and the metrics that do not fit the
run's data refused with the field named."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import ADMIN_KEY
from tests.unit.test_evals_api import finished

pytestmark = pytest.mark.filterwarnings("ignore:The Evals API is deprecated:DeprecationWarning")
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
NONEMPTY = {
    "type": "string_check",
    "name": "said",
    "input": "{{sample.output_text}}",
    "reference": "",
    "operation": "ne",
}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello there, how are you today?", "Paris is in France."]


def completed_run(client: openai.OpenAI, items: list[dict[str, Any]], criterion: dict[str, Any] = NONEMPTY) -> Any:
    evaluation = client.evals.create(
        name="metrics",
        data_source_config={"type": "custom", "item_schema": {"type": "object"}, "include_sample_schema": True},
        testing_criteria=[criterion],  # type: ignore[list-item]
    )
    run = client.evals.runs.create(
        evaluation.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": items}}
    )  # type: ignore[arg-type]
    assert finished(client, evaluation.id, run.id).status == "completed"
    return run


def metrics(http: TestClient, run: Any, headers: dict[str, str] = AUTH, **params: str) -> tuple[int, dict[str, Any]]:
    answer = http.get(f"/v1/evals/{run.eval_id}/runs/{run.id}/task_metrics", params=params, headers=headers)
    return answer.status_code, answer.json()


def test_ner_translation_and_summarization_over_a_runs_samples(client: openai.OpenAI, http: TestClient) -> None:
    tagged = [
        {"item": {"tags": ["B-PER", "I-PER", "O"]}, "sample": {"output_text": "B-PER I-PER O"}},
        {"item": {"tags": ["B-LOC", "O"]}, "sample": {"output_text": '["O", "O"]'}},
    ]
    code, ner = metrics(http, completed_run(client, tagged), task="ner", reference="{{item.tags}}")
    assert code == 200, ner
    assert (ner["object"], ner["task"], ner["items"]) == ("eval.run.task_metrics", "ner", 2)
    assert (ner["micro_precision"], ner["micro_recall"]) == (1.0, 0.5)
    assert ner["per_type"]["PER"]["f1"] == 1.0 and ner["per_type"]["LOC"]["f1"] == 0.0

    translated = [
        {
            "item": {"de": "Guten Morgen, wie geht es dir?", "en": ["good morning, how are you?"]},
            "sample": {"output_text": "good morning, how are you today?"},
        },
        {
            "item": {"de": "Vielen Dank", "en": ["thank you very much", "thanks a lot"]},
            "sample": {"output_text": "thanks a lot"},
        },
    ]
    run = completed_run(client, translated)
    code, mt = metrics(http, run, task="translation", reference="{{item.en}}")
    assert code == 200, mt
    assert 0 < mt["bleu"] < 100 and 0 < mt["chrf"] < 100 and mt["bleu_signature"].startswith("nrefs:var")
    code, summary = metrics(http, run, task="summarization", reference="{{item.en}}")
    # 5 of 6 words right against 5 (F 10/11); the second reference exactly
    assert code == 200 and summary["rouge_1"] == pytest.approx((10 / 11 + 1.0) / 2)

    # a metric that does not fit the data: the field that names it in the error
    cases = [
        ({"task": "ner", "reference": "{{item.de}}"}, 400, "reference"),  # "Guten Morgen" are no tags
        ({"task": "translation", "reference": "{{item.missing}}"}, 400, "reference"),  # no references
        ({"task": "bias"}, 400, "task"),  # not the bias probe's items
        ({"task": "ner", "model": "tiny-chat"}, 400, "model"),  # read by perplexity only
        ({"task": "sentiment"}, 400, "task"),
    ]
    for params, status, param in cases:
        code, error = metrics(http, run, **params)
        assert (code, error["error"]["param"]) == (status, param), (params, error)


def _transformers_perplexity(model_dir: Path, texts: list[str]) -> tuple[float, int]:
    """The texts' token perplexity by the model's own forward pass, tokenized as the engine does."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text, add_special_tokens=True)["input_ids"]])
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
            total += float(logprobs.gather(1, ids[0, 1:, None]).sum())
            tokens += ids.shape[1] - 1
    return math.exp(-total / tokens), tokens


def test_perplexity_scores_the_items_text_with_the_model_through_prompt_scoring(
    client: openai.OpenAI, http: TestClient, tiny_chat_dir: Path
) -> None:
    run = completed_run(client, [{"item": {"text": t}, "sample": {"output_text": "x"}} for t in TEXTS])
    code, report = metrics(http, run, task="perplexity", model="tiny-chat")
    assert code == 200, report
    expected, tokens = _transformers_perplexity(tiny_chat_dir, TEXTS)
    assert (report["task"], report["model"], report["items"], report["tokens"]) == (
        "perplexity",
        "tiny-chat",
        3,
        tokens,
    )
    assert report["perplexity"] == pytest.approx(expected, rel=1e-3)
    assert report["mean_logprob"] == pytest.approx(-math.log(expected), rel=1e-3)
    code, other = metrics(http, run, task="perplexity", model="tiny-chat", text="{{item.text}} {{item.text}}")
    assert code == 200 and other["tokens"] > tokens  # the template chooses what is scored

    cases: list[tuple[dict[str, str], int, str]] = [
        ({"model": "tiny-embed"}, 400, "model"),  # an encoder has no perplexity
        ({"model": "no-such-model"}, 404, "model"),
        ({}, 400, "model"),  # the run's answers came with its items: the run names no model that exists
        ({"model": "tiny-chat", "text": "{{item.nothing}}"}, 400, "text"),
        ({"model": "tiny-chat", "text": "{{ nope }}"}, 400, "text"),
    ]
    for params, status, param in cases:
        code, error = metrics(http, run, task="perplexity", **params)
        assert (code, error["error"]["param"]) == (status, param), (params, error)
    _, error = metrics(http, run, task="perplexity", model="tiny-embed")
    assert "perplexity needs a causal language model" in error["error"]["message"]
