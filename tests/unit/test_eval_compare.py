"""``GET /v1/evals/{eval_id}/compare`` (native, plain HTTP): two completed runs of one eval over the
same items, each mean, the difference and its paired bootstrap interval, overall and per criterion;
runs matched by their items alone, as eval-gated promotion now matches them too; runs of another
eval or tenant, unfinished runs and runs over other items refused; ``llmos eval compare``."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from llmos.api import create_app
from llmos.cli import evals as eval_cli
from llmos.cli.main import app as cli_app
from llmos.evals.bootstrap import paired_bootstrap
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.unit.test_evals_api import client_for, finished
from tests.unit.test_promotion import ADMIN, ITEMS, make_eval, promote, run, served  # noqa: F401  (fixture)

pytestmark = pytest.mark.filterwarnings("ignore:The Evals API is deprecated:DeprecationWarning")
SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}, "a": {"type": "string"}}, "required": ["q", "a"]}
EXACT = {
    "type": "string_check",
    "name": "exact",
    "operation": "eq",
    "input": "{{sample.output_text}}",
    "reference": "{{item.a}}",
}
NEAR = {
    "type": "text_similarity",
    "name": "near",
    "input": "{{sample.output_text}}",
    "reference": "{{item.a}}",
    "evaluation_metric": "fuzzy_match",
    "pass_threshold": 0.5,
}
QUESTIONS = [{"q": f"question {i}", "a": f"answer {i}"} for i in range(30)]


def answered(model: str, right: int) -> list[dict[str, Any]]:
    """The questions with ``model``'s samples: the first ``right`` answered exactly, the rest wrongly."""
    return [
        {"item": q, "sample": {"model": model, "output_text": q["a"] if i < right else "no idea"}}
        for i, q in enumerate(QUESTIONS)
    ]


def jsonl_run(client: openai.OpenAI, eval_id: str, items: list[dict[str, Any]]) -> str:
    source = {"type": "jsonl", "source": {"type": "file_content", "content": items}}
    made = client.evals.runs.create(eval_id, data_source=source)  # type: ignore[arg-type]
    return str(finished(client, eval_id, made.id).id)


def compare(http: TestClient, eval_id: str, a: str, b: str, key: str = ADMIN_KEY) -> tuple[int, dict[str, Any]]:
    answer = http.get(
        f"/v1/evals/{eval_id}/compare", params={"run_a": a, "run_b": b}, headers={"Authorization": f"Bearer {key}"}
    )
    return answer.status_code, answer.json()


def test_two_models_jsonl_runs_over_the_same_items_are_compared(client: openai.OpenAI, http: TestClient) -> None:
    evaluation = client.evals.create(
        name="qa",
        data_source_config={"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True},
        testing_criteria=[EXACT, NEAR],  # type: ignore[list-item]
    )
    better = jsonl_run(client, evaluation.id, answered("model-b", 24))
    worse = jsonl_run(client, evaluation.id, answered("model-a", 12))  # the same items, other samples
    code, result = compare(http, evaluation.id, better, worse)
    assert code == 200, result
    assert result["object"] == "eval.comparison" and result["eval_id"] == evaluation.id
    assert (result["run_a"]["model"], result["run_b"]["model"]) == ("model-b", "model-a")
    overall = result["overall"]
    assert (overall["items"], overall["unpaired"]) == (30, 0)
    # "no idea" is not near "answer i" either: an item passes both criteria or neither
    assert (overall["mean_a"], overall["mean_b"]) == (pytest.approx(24 / 30), pytest.approx(12 / 30))
    diffs = [float(i < 24) - float(i < 12) for i in range(30)]
    mean, low, high = paired_bootstrap(diffs, [0.0] * 30, seed=0)
    assert overall["difference"] == pytest.approx(mean) == pytest.approx(0.4)
    assert overall["interval"] == [pytest.approx(low), pytest.approx(high)] and low > 0
    assert overall["excludes_zero"] is True and result["confidence"] == 0.95
    per = {r["testing_criteria"]: r for r in result["per_testing_criteria"]}
    assert set(per) == {"exact", "near"}
    assert per["exact"]["difference"] == pytest.approx(0.4) and per["exact"]["items"] == 30
    assert per["near"]["mean_a"] > per["near"]["mean_b"]  # the grader's own score (a similarity)

    code, reverse = compare(http, evaluation.id, worse, better)  # the sign follows a - b
    assert code == 200 and reverse["overall"]["difference"] == pytest.approx(-0.4)
    assert reverse["overall"]["interval"][1] < 0


def test_runs_that_cannot_be_compared_are_refused(
    client: openai.OpenAI, http: TestClient, loaded_platform: Platform
) -> None:
    evaluation = client.evals.create(
        name="qa",
        data_source_config={"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True},
        testing_criteria=[EXACT],  # type: ignore[list-item]
    )
    other_eval = client.evals.create(
        name="other",
        data_source_config={"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True},
        testing_criteria=[EXACT],  # type: ignore[list-item]
    )
    good = jsonl_run(client, evaluation.id, answered("m", 20))
    also = jsonl_run(client, evaluation.id, answered("n", 10))
    fewer = jsonl_run(client, evaluation.id, answered("n", 10)[:20])
    shuffled = jsonl_run(client, evaluation.id, answered("n", 10)[::-1])
    elsewhere = jsonl_run(client, other_eval.id, answered("n", 10))
    cases: list[tuple[str, str, str, int, str, str | None]] = [
        (evaluation.id, good, fewer, 400, "run_b", "eval_items_differ"),
        (evaluation.id, good, shuffled, 400, "run_b", "eval_items_differ"),  # items pair by position
        (evaluation.id, good, good, 400, "run_b", None),
        (evaluation.id, good, elsewhere, 404, "run_b", None),  # a run of another eval is not this eval's
        (evaluation.id, "evalrun_nope", also, 404, "run_a", None),
        ("eval_nope", good, also, 404, "eval_id", None),
    ]
    for eval_id, a, b, status, param, code in cases:
        answer, error = compare(http, eval_id, a, b)
        assert (answer, error["error"]["param"]) == (status, param), (a, b, error)
        if code is not None:
            assert error["error"]["code"] == code
    missing = http.get(f"/v1/evals/{evaluation.id}/compare", params={"run_a": good}, headers=ADMIN)
    assert (missing.status_code, missing.json()["error"]["param"]) == (400, "run_b")

    # another tenant's eval and runs do not exist for it
    loaded_platform.tenants.create("bob")
    _, bob_key = loaded_platform.keys.create("bob-app", tenant="bob", scopes=("inference",))
    answer, error = compare(http, evaluation.id, good, also, key=bob_key)
    assert (answer, error["error"]["param"]) == (404, "eval_id")


def test_an_unfinished_run_is_refused(loaded_platform: Platform) -> None:
    idle = dataclasses.replace(
        loaded_platform, settings=loaded_platform.settings.model_copy(update={"eval_concurrency": 0})
    )
    with TestClient(create_app(platform=idle)) as http:
        client = client_for(http, ADMIN_KEY)
        evaluation = client.evals.create(
            name="qa",
            data_source_config={"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True},
            testing_criteria=[EXACT],  # type: ignore[list-item]
        )
        source = {"type": "jsonl", "source": {"type": "file_content", "content": answered("m", 3)}}
        queued = client.evals.runs.create(evaluation.id, data_source=source)  # type: ignore[arg-type]
        canceled = client.evals.runs.create(evaluation.id, data_source=source)  # type: ignore[arg-type]
        client.evals.runs.cancel(canceled.id, eval_id=evaluation.id)
        code, error = compare(http, evaluation.id, queued.id, canceled.id)
        assert (code, error["error"]["param"], error["error"]["code"]) == (400, "run_a", "eval_run_not_completed")


def test_promotion_matches_runs_by_their_items_alone(served: TestClient) -> None:  # noqa: F811
    """A completions run whose items came with (stale) samples still pairs with one whose items did
    not: the model answered both, over the same items."""
    eval_id = make_eval(served)
    baseline = run(served, eval_id, "tiny-chat@1")
    stale = [{**item, "sample": {"output_text": "from an older export", "model": "x"}} for item in ITEMS]
    candidate = run(served, eval_id, "tiny-chat@2", stale)
    code, moved = promote(
        served,
        {"target": "tiny-chat@2", "eval": {"eval_id": eval_id, "candidate_run": candidate, "baseline_run": baseline}},
    )
    assert code == 200, moved
    assert moved["promotion"]["items"] == 40 and moved["promotion"]["better"] is True
    code, compared = compare(served, eval_id, candidate, baseline)
    assert code == 200 and compared["overall"]["difference"] == pytest.approx(0.5)


def test_llmos_eval_compare_prints_the_table(
    client: openai.OpenAI, http: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eval_cli, "api_client", lambda settings, key: client)
    evaluation = client.evals.create(
        name="qa",
        data_source_config={"type": "custom", "item_schema": SCHEMA, "include_sample_schema": True},
        testing_criteria=[EXACT],  # type: ignore[list-item]
    )
    a = jsonl_run(client, evaluation.id, answered("model-b", 24))
    b = jsonl_run(client, evaluation.id, answered("model-a", 12))
    shown = CliRunner().invoke(cli_app, ["eval", "compare", evaluation.id, a, b], env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "+0.4000 *" in shown.output and "(all criteria)" in shown.output and "exact" in shown.output
    as_json = CliRunner().invoke(cli_app, ["eval", "compare", evaluation.id, a, b, "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert json.loads(as_json.output)["overall"]["difference"] == pytest.approx(0.4)
    wrong = CliRunner().invoke(cli_app, ["eval", "compare", evaluation.id, a, "evalrun_nope"])
    assert wrong.exit_code == 1 and "error" in wrong.output
