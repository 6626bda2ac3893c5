"""OpenAI's Evals API through the official ``openai`` client: evals created, listed, updated and
deleted; runs over inline items, an ``evals`` file and stored completions, answered by the tiny
chat model and graded (string checks, similarity, a label model); cancel, resume, delete; per
tenant; bad input refused with the field named and nothing stored."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.evals.bootstrap import paired_bootstrap
from llmos.evals.runs import RunStore
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY

# The openai package marks its Evals API deprecated (OpenAI's hosted one); the shape is what is served here.
pytestmark = pytest.mark.filterwarnings("ignore:The Evals API is deprecated:DeprecationWarning")

SCHEMA = {
    "type": "object",
    "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
    "required": ["question", "answer"],
}
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
NEAR = {
    "type": "text_similarity",
    "name": "near",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "evaluation_metric": "fuzzy_match",
    "pass_threshold": 0.6,
}
ITEMS = [
    {"item": {"question": "Capital of France?", "answer": "Paris"}, "sample": {"output_text": "Paris", "model": "m"}},
    {"item": {"question": "Capital of Italy?", "answer": "Rome"}, "sample": {"output_text": "Rom", "model": "m"}},
    {"item": {"question": "2+2?", "answer": "4"}, "sample": {"output_text": "five", "model": "m"}},
]
TERMINAL = {"completed", "failed", "canceled"}


def client_for(http: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


def tenant_client(http: TestClient, platform: Platform, tenant: str) -> openai.OpenAI:
    platform.tenants.create(tenant)
    _, secret = platform.keys.create(f"{tenant}-app", tenant=tenant, scopes=("inference", "files"))
    return client_for(http, secret)


def finished(client: openai.OpenAI, eval_id: str, run_id: str) -> Any:
    for _ in range(2400):  # the run is graded on the server's event loop
        run = client.evals.runs.retrieve(run_id, eval_id=eval_id)
        if run.status in TERMINAL:
            return run
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} is still {run.status}")


def custom_eval(client: openai.OpenAI, *criteria: dict[str, Any], **extra: Any) -> Any:
    return client.evals.create(
        name="capitals",
        data_source_config={"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True},
        testing_criteria=list(criteria or (EXACT, NEAR)),  # type: ignore[arg-type]
        **extra,
    )


def test_an_eval_is_created_listed_updated_and_deleted(client: openai.OpenAI) -> None:
    first = custom_eval(client, metadata={"team": "qa"})
    second = custom_eval(client)
    assert first.object == "eval" and first.name == "capitals" and first.metadata == {"team": "qa"}
    assert first.data_source_config.type == "custom"
    assert first.data_source_config.schema_["properties"]["item"] == SCHEMA  # type: ignore[union-attr]
    assert [c.name for c in first.testing_criteria] == ["exact", "near"]  # type: ignore[union-attr]
    assert client.evals.retrieve(first.id).testing_criteria[1].evaluation_metric == "fuzzy_match"  # type: ignore[union-attr]

    assert [e.id for e in client.evals.list()] == [first.id, second.id]
    assert [e.id for e in client.evals.list(order="desc")] == [second.id, first.id]
    assert [e.id for e in client.evals.list(limit=1)] == [first.id, second.id]  # follows ``after``

    renamed = client.evals.update(first.id, name="capitals v2", metadata={"team": "ml"})
    assert (renamed.name, renamed.metadata) == ("capitals v2", {"team": "ml"})
    assert next(e.id for e in client.evals.list(order_by="updated_at", order="desc")) == first.id

    deleted = client.evals.delete(first.id)
    assert (deleted.deleted, deleted.eval_id) == (True, first.id)
    with pytest.raises(openai.NotFoundError):
        client.evals.retrieve(first.id)
    assert [e.id for e in client.evals.list()] == [second.id]


def test_a_run_over_inline_items_grades_each_with_every_criterion(
    client: openai.OpenAI, http: TestClient, loaded_platform: Platform
) -> None:
    evaluation = custom_eval(client)
    run = client.evals.runs.create(
        evaluation.id,
        name="given answers",
        data_source={"type": "jsonl", "source": {"type": "file_content", "content": ITEMS}},  # type: ignore[typeddict-item]
        metadata={"round": "1"},
    )
    assert run.object == "eval.run" and run.status in ("queued", "in_progress", "completed")
    run = finished(client, evaluation.id, run.id)
    assert run.status == "completed" and run.name == "given answers" and run.metadata == {"round": "1"}
    assert run.model == "m"
    counts = run.result_counts
    assert (counts.total, counts.passed, counts.failed, counts.errored) == (3, 1, 2, 0)
    per = {r.testing_criteria: (r.passed, r.failed) for r in run.per_testing_criteria_results}
    assert per == {"exact": (1, 2), "near": (2, 1)}  # "Rom" is near "Rome"; "five" is near nothing

    items = list(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id))
    assert [i.datasource_item_id for i in items] == [0, 1, 2]
    assert [i.status for i in items] == ["pass", "fail", "fail"]
    assert items[1].datasource_item == ITEMS[1]["item"]
    assert [(r.name, r.passed) for r in items[1].results] == [("exact", False), ("near", True)]
    assert items[1].results[1].score == pytest.approx(6 / 7)
    passed = client.evals.runs.output_items.list(run.id, eval_id=evaluation.id, status="pass")
    assert [i.id for i in passed] == [items[0].id]
    one = client.evals.runs.output_items.retrieve(items[2].id, eval_id=evaluation.id, run_id=run.id)
    assert one.results[0].passed is False and one.sample.output[0].content == "five"

    # The stored scores pair two runs of the same items for the bootstrap (eval-gated promotion).
    better = [{**ITEMS[2], "sample": {"output_text": "4"}}]
    second = client.evals.runs.create(
        evaluation.id,
        data_source={"type": "jsonl", "source": {"type": "file_content", "content": [*ITEMS[:2], *better]}},  # type: ignore[typeddict-item]
    )
    finished(client, evaluation.id, second.id)
    store = RunStore(loaded_platform.db)
    assert store.per_item_scores(run.id) == {0: 1.0, 1: 0.5, 2: 0.0}
    assert store.per_item_scores(second.id, "exact") == {0: 1.0, 1: 0.0, 2: 1.0}
    a, b = store.per_item_scores(second.id), store.per_item_scores(run.id)
    mean, low, high = paired_bootstrap([a[k] for k in sorted(a)], [b[k] for k in sorted(b)], iterations=200)
    assert mean == pytest.approx(1 / 3) and low <= mean <= high

    metrics = http.get(
        f"/v1/evals/{evaluation.id}/runs/{run.id}/task_metrics",
        params={"task": "extractive_qa", "reference": "{{item.answer}}"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    ).json()
    assert (metrics["items"], metrics["exact_match"]) == (3, pytest.approx(1 / 3))
    bad = http.get(
        f"/v1/evals/{evaluation.id}/runs/{run.id}/task_metrics",
        params={"task": "classification", "reference": "{{item.answer | upper}}"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reference"

    assert [r.id for r in client.evals.runs.list(evaluation.id)] == [run.id, second.id]
    assert [r.id for r in client.evals.runs.list(evaluation.id, order="desc", status="completed")] == [
        second.id,
        run.id,
    ]
    assert client.evals.runs.list(evaluation.id, status="failed").data == []
    gone = client.evals.runs.delete(run.id, eval_id=evaluation.id)
    assert (gone.deleted, gone.run_id) == (True, run.id)
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve(run.id, eval_id=evaluation.id)
    assert store.per_item_scores(run.id) == {}  # its output items went with it


def test_a_completions_run_has_the_model_answer_and_a_model_grade(client: openai.OpenAI) -> None:
    judge = {
        "type": "label_model",
        "name": "judge",
        "model": "tiny-chat",
        "input": [
            {"role": "system", "content": "Is the answer correct? Answer yes or no."},
            {"role": "user", "content": "Q: {{item.question}} A: {{sample.output_text}}"},
        ],
        "labels": ["yes", "no"],
        "passing_labels": ["yes"],
    }
    evaluation = custom_eval(client, EXACT, judge)
    run = client.evals.runs.create(
        evaluation.id,
        data_source={
            "type": "completions",
            "model": "tiny-chat",
            "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]},
            "source": {"type": "file_content", "content": [{"item": i["item"]} for i in ITEMS[:2]]},
            "sampling_params": {"temperature": 0, "max_completion_tokens": 3, "seed": 7},
        },  # type: ignore[typeddict-item]
    )
    run = finished(client, evaluation.id, run.id)
    assert run.status == "completed" and run.model == "tiny-chat"
    assert run.result_counts.total == 2 and run.result_counts.errored == 0
    (usage,) = run.per_model_usage
    assert usage.model_name == "tiny-chat" and usage.invocation_count == 4  # an answer and a judgement per item
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0
    for item in client.evals.runs.output_items.list(run.id, eval_id=evaluation.id):
        assert item.sample.model == "tiny-chat" and item.sample.max_completion_tokens == 3
        assert item.sample.input[0].content == item.datasource_item["question"]
        assert item.sample.usage.completion_tokens <= 3
        exact, judged = item.results
        assert exact.passed == (item.sample.output[0].content == item.datasource_item["answer"])
        assert judged.sample["label"] in ("yes", "no") and judged.passed == (judged.sample["label"] == "yes")


def test_runs_read_an_evals_file_and_stored_completions(client: openai.OpenAI) -> None:
    lines = "\n".join(json.dumps(i) for i in ITEMS).encode()
    upload = client.files.create(file=("items.jsonl", io.BytesIO(lines)), purpose="evals")  # type: ignore[arg-type]
    assert upload.status == "processed"
    evaluation = custom_eval(client)
    run = client.evals.runs.create(
        evaluation.id, data_source={"type": "jsonl", "source": {"type": "file_id", "id": upload.id}}
    )
    assert finished(client, evaluation.id, run.id).result_counts.passed == 1

    for metadata in ({"app": "faq"}, {"app": "faq"}, {"app": "other"}):
        client.chat.completions.create(
            model="tiny-chat",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=3,
            temperature=0,
            store=True,
            metadata=metadata,
        )
    stored_eval = client.evals.create(
        data_source_config={"type": "stored_completions", "metadata": {"app": "faq"}},
        testing_criteria=[
            {
                "type": "string_check",
                "name": "answered",
                "input": "{{sample.output_text}}",
                "reference": "",
                "operation": "ne",
            },
            {
                "type": "string_check",
                "name": "asked",
                "input": "{{item.input.0.content}}",
                "reference": "Hello",
                "operation": "eq",
            },
        ],  # type: ignore[list-item]
    )
    assert stored_eval.data_source_config.type == "stored_completions"
    run = client.evals.runs.create(
        stored_eval.id,
        data_source={"type": "completions", "source": {"type": "stored_completions", "metadata": {"app": "faq"}}},  # type: ignore[typeddict-item]
    )
    run = finished(client, stored_eval.id, run.id)
    assert run.model == "tiny-chat"
    assert run.result_counts.total == 2
    assert {r.testing_criteria: r.passed for r in run.per_testing_criteria_results}["asked"] == 2


def test_cancel_stops_a_run_and_a_restarted_server_resumes_the_rest(loaded_platform: Platform) -> None:
    idle = dataclasses.replace(
        loaded_platform, settings=loaded_platform.settings.model_copy(update={"eval_concurrency": 0})
    )
    with TestClient(create_app(platform=idle)) as http:
        client = client_for(http, ADMIN_KEY)
        evaluation = custom_eval(client)
        source = {"type": "jsonl", "source": {"type": "file_content", "content": ITEMS}}
        kept = client.evals.runs.create(evaluation.id, data_source=source)  # type: ignore[arg-type]
        dropped = client.evals.runs.create(evaluation.id, data_source=source)  # type: ignore[arg-type]
        assert client.evals.runs.retrieve(kept.id, eval_id=evaluation.id).status == "queued"
        canceled = client.evals.runs.cancel(dropped.id, eval_id=evaluation.id)
        assert canceled.status == "canceled"
        with pytest.raises(openai.BadRequestError) as err:
            client.evals.runs.cancel(dropped.id, eval_id=evaluation.id)
        assert err.value.body["code"] == "invalid_run_state"  # type: ignore[index]
    with TestClient(create_app(platform=loaded_platform)) as http:  # a server that runs evals
        client = client_for(http, ADMIN_KEY)
        assert finished(client, evaluation.id, kept.id).result_counts.total == 3
        assert client.evals.runs.retrieve(dropped.id, eval_id=evaluation.id).result_counts.total == 0


BAD_EVALS = [
    ({"data_source_config": {"type": "custom", "item_schema": {"type": "nonsense"}}}, "data_source_config.item_schema"),
    ({"data_source_config": {"type": "sql", "query": "x"}}, "data_source_config.type"),
    ({"testing_criteria": [{"type": "python", "name": "p", "source": "import os"}]}, "testing_criteria[0].type"),
    ({"testing_criteria": [{**EXACT, "input": "{{item.missing}}"}]}, "testing_criteria[0].input"),
    ({"testing_criteria": [{**EXACT, "reference": "{% for x in y %}{{x}}"}]}, "testing_criteria[0].reference"),
    ({"testing_criteria": []}, "testing_criteria"),
    ({"metadata": {"k": "v" * 600}}, "metadata.k"),
    ({"unknown": 1}, "unknown"),
]


@pytest.mark.parametrize(("change", "param"), BAD_EVALS)
def test_bad_evals_are_refused_and_nothing_is_stored(
    client: openai.OpenAI, http: TestClient, change: dict[str, Any], param: str | None
) -> None:
    body = {
        "data_source_config": {"type": "custom", "item_schema": SCHEMA},
        "testing_criteria": [EXACT],
        **change,
    }
    r = http.post("/v1/evals", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param
    assert client.evals.list().data == []


def test_a_grader_model_the_caller_cannot_use_is_404(client: openai.OpenAI) -> None:
    judge = {
        "type": "label_model",
        "name": "j",
        "model": "no-such-model",
        "labels": ["a"],
        "passing_labels": ["a"],
        "input": [{"role": "user", "content": "x"}],
    }
    with pytest.raises(openai.NotFoundError) as err:
        custom_eval(client, judge)
    assert err.value.body["param"] == "testing_criteria[0].model"  # type: ignore[index]
    assert client.evals.list().data == []


def test_bad_runs_are_refused_and_nothing_is_stored(
    client: openai.OpenAI, http: TestClient, loaded_platform: Platform
) -> None:
    evaluation = custom_eval(client)
    bob = tenant_client(http, loaded_platform, "bob")
    bobs_file = bob.files.create(file=("b.jsonl", io.BytesIO(json.dumps(ITEMS[0]).encode())), purpose="evals")  # type: ignore[arg-type]
    tuning = client.files.create(
        file=(
            "t.jsonl",
            io.BytesIO(
                json.dumps(
                    {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
                ).encode()
            ),
        ),  # type: ignore[arg-type]
        purpose="fine-tune",
    )
    content = {"type": "file_content", "content": ITEMS}
    answering = {"type": "template", "template": [{"role": "user", "content": "{{item.question}}"}]}
    cases: list[tuple[Any, int, str]] = [
        (
            {"type": "jsonl", "source": {"type": "file_content", "content": [ITEMS[0], {"item": {"question": 3}}]}},
            400,
            "data_source.source.content[1].item",
        ),
        (
            {"type": "jsonl", "source": {"type": "file_content", "content": [{"item": ITEMS[0]["item"]}]}},
            400,
            "data_source.source.content[0].sample",
        ),
        ({"type": "jsonl", "source": {"type": "file_id", "id": bobs_file.id}}, 404, "file_id"),
        ({"type": "jsonl", "source": {"type": "file_id", "id": tuning.id}}, 400, "data_source.source.id"),
        ({"type": "responses", "source": content}, 400, "data_source.type"),
        ({"type": "completions", "source": content}, 400, "data_source.model"),
        (
            {"type": "completions", "source": content, "model": "ghost", "input_messages": answering},
            404,
            "data_source.model",
        ),
        (
            {
                "type": "completions",
                "source": content,
                "model": "tiny-chat",
                "input_messages": answering,
                "sampling_params": {"temperature": 9},
            },
            400,
            "data_source.sampling_params.temperature",
        ),
        (
            {
                "type": "completions",
                "source": content,
                "model": "tiny-chat",
                "input_messages": {
                    "type": "template",
                    "template": [{"role": "user", "content": "{{sample.output_text}}"}],
                },
            },
            400,
            "data_source.input_messages.template[0]",
        ),
    ]
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for data_source, status, param in cases:
        r = http.post(f"/v1/evals/{evaluation.id}/runs", json={"data_source": data_source}, headers=headers)
        assert r.status_code == status, (param, r.text)
        assert r.json()["error"]["param"] == param
    assert client.evals.runs.list(evaluation.id).data == []
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.create("eval_000", data_source={"type": "jsonl", "source": content})  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.evals.runs.retrieve("evalrun_000", eval_id=evaluation.id)


def test_another_tenants_evals_do_not_exist(http: TestClient, loaded_platform: Platform) -> None:
    alice = tenant_client(http, loaded_platform, "alice")
    bob = tenant_client(http, loaded_platform, "bob")
    evaluation = custom_eval(alice)
    run = alice.evals.runs.create(
        evaluation.id,
        data_source={"type": "jsonl", "source": {"type": "file_content", "content": ITEMS}},  # type: ignore[typeddict-item]
    )
    assert bob.evals.list().data == []
    for call in (
        lambda: bob.evals.retrieve(evaluation.id),
        lambda: bob.evals.update(evaluation.id, name="mine"),
        lambda: bob.evals.delete(evaluation.id),
        lambda: bob.evals.runs.list(evaluation.id),
        lambda: bob.evals.runs.retrieve(run.id, eval_id=evaluation.id),
        lambda: bob.evals.runs.cancel(run.id, eval_id=evaluation.id),
        lambda: bob.evals.runs.output_items.list(run.id, eval_id=evaluation.id),
        lambda: bob.evals.runs.create(
            evaluation.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": ITEMS}}
        ),  # type: ignore[typeddict-item]
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert finished(alice, evaluation.id, run.id).status == "completed"
    assert alice.evals.retrieve(evaluation.id).name == "capitals"


def test_cosine_similarity_embeds_through_the_evals_embedding_model(loaded_platform: Platform) -> None:
    settings = loaded_platform.settings.model_copy(update={"eval_embedding_model": "tiny-embed"})
    with TestClient(create_app(platform=dataclasses.replace(loaded_platform, settings=settings))) as http:
        client = client_for(http, ADMIN_KEY)
        cosine = {**NEAR, "name": "cosine", "evaluation_metric": "cosine", "pass_threshold": 0.999}
        evaluation = custom_eval(client, cosine)
        same = {"item": {"question": "q", "answer": "a red apple"}, "sample": {"output_text": "a red apple"}}
        other = {
            "item": {"question": "q", "answer": "a red apple"},
            "sample": {"output_text": "quantum chromodynamics"},
        }
        run = client.evals.runs.create(
            evaluation.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": [same, other]}}
        )
        run = finished(client, evaluation.id, run.id)
        assert run.status == "completed"
        assert [(u.model_name, u.invocation_count) for u in run.per_model_usage] == [("tiny-embed", 2)]
        first, second = client.evals.runs.output_items.list(run.id, eval_id=evaluation.id)
        assert first.results[0].score == pytest.approx(1.0, abs=1e-5) and first.status == "pass"
        assert second.results[0].score < 0.999 and second.status == "fail"
