"""The bias probe (a shipped eval template): counterfactual pairs that differ only in the term, run
as an ordinary eval, and the gap between the two sides at ``task_metrics?task=bias`` with paired
bootstrap intervals; ``llmos eval bias-probe`` against a chat model and a classifier."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from llmos.cli import eval_studies
from llmos.cli.main import app as cli_app
from llmos.errors import InvalidRequestError
from llmos.evals import bias_probe as probe
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.unit.test_alert_outputs import build_tiny_classifier
from tests.unit.test_evals_api import finished

pytestmark = pytest.mark.filterwarnings("ignore:The Evals API is deprecated:DeprecationWarning")
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def test_the_two_sides_of_a_pair_differ_only_in_the_term() -> None:
    items = [e["item"] for e in probe.items()]
    pairs = sum(len(terms) for terms in probe.TERMS.values())
    assert len(items) == len(probe.PROMPTS) * pairs * 2
    by_pair: dict[str, list[dict[str, Any]]] = {}
    for item in items:
        by_pair.setdefault(item["pair"], []).append(item)
    for a, b in by_pair.values():
        assert (a["side"], b["side"]) == ("a", "b") and a["attribute"] == b["attribute"]
        assert a["term"] != b["term"] and a["term"] in a["input"] and b["term"] in b["input"]
        assert a["input"].replace(a["term"], "<term>") == b["input"].replace(b["term"], "<term>")
    assert {i["attribute"] for e in probe.items(["gender"]) for i in [e["item"]]} == {"gender"}
    with pytest.raises(InvalidRequestError) as err:
        probe.items(["religion"])
    assert err.value.param == "attributes"


def biased_answer(item: dict[str, Any]) -> str:
    """A model that favours side a on gender (yes / a higher score) and refuses side b on origin."""
    if item["attribute"] == "origin" and item["side"] == "b":
        return "I'm sorry, I cannot answer that."
    if item["kind"] == "score":
        return "8" if item["attribute"] == "gender" and item["side"] == "a" else "5"
    return "Yes." if item["attribute"] != "gender" or item["side"] == "a" else "No."


def test_the_report_finds_the_gaps_a_biased_model_has_and_none_elsewhere() -> None:
    namespaces = [{"item": e["item"], "sample": {"output_text": biased_answer(e["item"])}} for e in probe.items()]
    report = probe.bias_report(namespaces, "{{sample.output_text}}")
    gender, name, origin = (report["per_attribute"][a] for a in ("gender", "name", "origin"))
    label_prompts = sum(p.kind == "label" for p in probe.PROMPTS)
    assert gender["pairs"] == len(probe.PROMPTS) * 3
    yes = gender["labels"]["yes"]
    assert (yes["pairs"], yes["mean_a"], yes["mean_b"], yes["gap"]) == (label_prompts * 3, 1.0, 0.0, 1.0)
    assert yes["interval"] == [1.0, 1.0]
    assert gender["score"]["gap"] == pytest.approx(3.0) and gender["score"]["interval"][0] > 0
    assert gender["refusal"]["gap"] == 0.0 and gender["changed"]["mean_a"] == 1.0
    assert name["labels"]["yes"]["gap"] == 0.0 and name["labels"]["yes"]["interval"] == [0.0, 0.0]
    assert name["score"]["gap"] == 0.0 and name["changed"]["mean_a"] == 0.0
    assert origin["refusal"]["gap"] == -1.0  # side b refused every time
    assert origin["score"] is None  # no pair where both sides gave a number
    assert report["overall"]["pairs"] == gender["pairs"] + name["pairs"] + origin["pairs"]
    # a side not graded (an errored item) leaves its pair out
    assert (
        probe.bias_report(namespaces[1:], "{{sample.output_text}}")["overall"]["pairs"]
        == report["overall"]["pairs"] - 1
    )


def test_a_probe_run_reports_its_gaps_at_task_metrics(client: openai.OpenAI, http: TestClient) -> None:
    evaluation = client.evals.create(**probe.eval_spec())  # type: ignore[arg-type]
    content = [{**e, "sample": {"model": "judge", "output_text": biased_answer(e["item"])}} for e in probe.items()]
    run = client.evals.runs.create(
        evaluation.id, data_source={"type": "jsonl", "source": {"type": "file_content", "content": content}}
    )  # type: ignore[arg-type]
    assert finished(client, evaluation.id, run.id).status == "completed"
    answer = http.get(f"/v1/evals/{evaluation.id}/runs/{run.id}/task_metrics", params={"task": "bias"}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["task"] == "bias" and report["items"] == len(content)
    assert report["per_attribute"]["gender"]["labels"]["yes"]["gap"] == 1.0
    assert report["per_attribute"]["origin"]["refusal"]["interval"][1] < 0


def test_llmos_eval_bias_probe_with_a_chat_model(
    client: openai.OpenAI, http: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eval_studies, "api_client", lambda settings, key: client)
    ran = CliRunner().invoke(
        cli_app, ["eval", "bias-probe", "tiny-chat", "--attributes", "gender", "--max-tokens", "3", "--poll-s", "0.05"]
    )
    assert ran.exit_code == 0, ran.output
    assert "gender" in ran.output and str(len(probe.PROMPTS) * 3) in ran.output
    (run,) = [r for e in client.evals.list() for r in client.evals.runs.list(e.id)]
    assert run.model == "tiny-chat" and run.status == "completed" and run.result_counts.total == len(probe.PROMPTS) * 6
    bad = CliRunner().invoke(cli_app, ["eval", "bias-probe", "tiny-chat", "--attributes", "religion"])
    assert bad.exit_code == 2  # a usage error, before anything is created
    assert len(client.evals.list().data) == 1


def test_llmos_eval_bias_probe_with_a_classifier(
    client: openai.OpenAI,
    http: TestClient,
    loaded_platform: Platform,
    tiny_encoder_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loaded_platform.registry.pull(f"file:{build_tiny_classifier(tiny_encoder_dir, tmp_path / 'cls')}", name="tiny-cls")
    monkeypatch.setattr(eval_studies, "api_client", lambda settings, key: client)
    ran = CliRunner().invoke(cli_app, ["eval", "bias-probe", "tiny-cls", "--attributes", "name", "--poll-s", "0.05"])
    assert ran.exit_code == 0, ran.output
    (evaluation,) = client.evals.list()
    (run,) = client.evals.runs.list(evaluation.id)
    assert run.model == "tiny-cls"
    answer = http.get(f"/v1/evals/{evaluation.id}/runs/{run.id}/task_metrics", params={"task": "bias"}, headers=AUTH)
    name = answer.json()["per_attribute"]["name"]
    assert name["pairs"] == len(probe.PROMPTS) * 4
    assert set(name["probabilities"]) == {"negative", "positive"}  # the classifier's scores, per label
    first = next(iter(client.evals.runs.output_items.list(run.id, eval_id=evaluation.id)))
    assert first.sample.output[0].content in ("negative", "positive")
