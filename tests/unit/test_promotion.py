"""Eval-gated promotion: a candidate takes an alias only if two runs of one eval over the same items
show it better than the alias's current model (margin, and a paired bootstrap interval above zero);
the decision is returned, kept in the candidate's lineage and audited; an admin may override;
promotion without an eval, or with runs that do not compare these two models, is refused."""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.engine import FinishReason, GenerationDelta, GenerationRequest, ModelHandle, ModelInfo
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.fake_engine import FakeEngine
from tests.unit.test_aliases import key_for

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROMOTE = "/v1/model_aliases/tiny-chat@production/promote"


@dataclasses.dataclass
class SentimentEngine(FakeEngine):
    """Version 2 of a model reads the sentence and answers its sentiment; any other version always
    answers ``positive`` (right on half of balanced items). The prompt's characters are its tokens."""

    async def resolve(self, model: str) -> ModelHandle:
        self.calls.append("resolve")
        info = ModelInfo(name=model.partition("@")[0], task="chat", context_length=4096, has_chat_template=True)
        return ModelHandle(name=model, info=info)

    async def encode_chat(
        self, model: ModelHandle, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        return [ord(c) for c in str(messages[-1]["content"])]

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        self.requests.append(request)
        text = "".join(chr(t) for t in request.prompt_token_ids)
        reads = request.model.endswith("@2")  # the version that answered: the API routed the alias
        answer = "negative" if reads and "bad" in text else "positive"
        yield GenerationDelta(index=0, text=answer, token_ids=(1,))
        yield GenerationDelta(index=0, text="", finish_reason=FinishReason.STOP)


EVAL = {
    "name": "sentiment",
    "data_source_config": {
        "type": "custom",
        "item_schema": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "label": {"type": "string"}},
            "required": ["text", "label"],
        },
        "include_sample_schema": True,
    },
    "testing_criteria": [
        {
            "type": "string_check",
            "name": "label",
            "input": "{{sample.output_text}}",
            "reference": "{{item.label}}",
            "operation": "eq",
        }
    ],
}
ITEMS = [
    {"item": {"text": f"a {'bad' if i % 2 else 'good'} film, number {i}", "label": "negative" if i % 2 else "positive"}}
    for i in range(40)
]


@pytest.fixture
def served(loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path) -> Iterator[TestClient]:
    """The app on the sentiment engine, ``tiny-chat@production`` on version 1, version 2 pulled."""
    changed = shutil.copytree(tiny_chat_dir, tmp_path / "v2")
    (changed / "notes.txt").write_text("the second version")
    loaded_platform.registry.pull(f"file:{changed}", name="tiny-chat")
    with TestClient(create_app(platform=loaded_platform, engine=SentimentEngine())) as http:
        made = http.post(
            "/v1/model_aliases",
            json={"model": "tiny-chat", "alias": "production", "target": "tiny-chat@1"},
            headers=ADMIN,
        )
        assert made.status_code == 200, made.text
        yield http


def make_eval(http: TestClient) -> str:
    made = http.post("/v1/evals", json=EVAL, headers=ADMIN)
    assert made.status_code == 200, made.text
    return str(made.json()["id"])


def run(http: TestClient, eval_id: str, model: str, items: list[dict[str, Any]] = ITEMS) -> str:
    """A completed run of ``eval_id`` in which ``model`` answers ``items``."""
    source = {
        "type": "completions",
        "model": model,
        "input_messages": {"type": "template", "template": [{"role": "user", "content": "{{item.text}}"}]},
        "source": {"type": "file_content", "content": items},
    }
    made = http.post(f"/v1/evals/{eval_id}/runs", json={"data_source": source}, headers=ADMIN)
    assert made.status_code == 200, made.text
    run_id = str(made.json()["id"])
    deadline = time.monotonic() + 60
    while (status := http.get(f"/v1/evals/{eval_id}/runs/{run_id}", headers=ADMIN).json()["status"]) != "completed":
        assert status in ("queued", "in_progress") and time.monotonic() < deadline, status
        time.sleep(0.05)
    return run_id


def promote(http: TestClient, body: dict[str, Any], headers: dict[str, str] = ADMIN) -> tuple[int, dict[str, Any]]:
    answer = http.post(PROMOTE, json=body, headers=headers)
    return answer.status_code, answer.json()


def production(platform: Platform) -> int:
    return platform.registry.get("tiny-chat@production").version


def test_a_better_candidate_is_promoted_and_the_decision_kept_in_its_lineage(
    served: TestClient, loaded_platform: Platform
) -> None:
    eval_id = make_eval(served)
    baseline = run(served, eval_id, "tiny-chat@production")  # counts: the alias has not moved since
    candidate = run(served, eval_id, "tiny-chat@2")
    comparison = {"eval_id": eval_id, "candidate_run": candidate, "baseline_run": baseline}

    code, moved = promote(served, {"target": "tiny-chat@2", "eval": comparison})
    assert code == 200, moved
    decision = moved["promotion"]
    assert moved["target"]["root"] == "tiny-chat@2" and production(loaded_platform) == 2
    assert decision["items"] == 40 and decision["better"] is True and decision["overridden"] is False
    assert decision["candidate_mean"] == 1.0 and decision["baseline_mean"] == 0.5
    assert decision["difference"] == pytest.approx(0.5) and 0.0 < decision["low"] <= 0.5 <= decision["high"]
    assert decision["source"] == {**comparison, "criterion": None}

    version2 = loaded_platform.registry.get("tiny-chat@2")
    assert version2.extra["promotions"][-1] == {
        **decision,
        "decided_at": version2.extra["promotions"][-1]["decided_at"],
    }
    shown = served.get("/v1/models/tiny-chat@2", headers=ADMIN).json()
    assert shown["extra"]["promotions"][-1]["better"] is True
    event = loaded_platform.audit.query(action="model.alias.promote")[0]
    assert (event.outcome, event.target, event.detail["to"], event.detail["decision"]["better"]) == (
        "success",
        "tiny-chat@production",
        version2.id,
        True,
    )
    # production now answers with the new version; a rollback takes it back in one call
    chat = {"model": "tiny-chat@production", "messages": [{"role": "user", "content": "a bad film"}]}
    assert served.post("/v1/chat/completions", json=chat, headers=ADMIN).json()["model"] == "tiny-chat@2"
    assert served.post("/v1/model_aliases/tiny-chat@production/rollback", headers=ADMIN).status_code == 200
    assert production(loaded_platform) == 1


def test_a_candidate_not_shown_better_is_refused_unless_an_admin_overrides(
    served: TestClient, loaded_platform: Platform
) -> None:
    eval_id = make_eval(served)
    # both versions answer alike on sentences without "bad": no difference to find
    alike = [item for item in ITEMS if item["item"]["label"] == "positive"]
    comparison = {
        "eval_id": eval_id,
        "candidate_run": run(served, eval_id, "tiny-chat@2", alike),
        "baseline_run": run(served, eval_id, "tiny-chat@1", alike),
    }
    code, refused = promote(served, {"target": "tiny-chat@2", "eval": comparison})
    assert (code, refused["error"]["code"], refused["error"]["param"]) == (409, "promotion_not_better", "eval")
    assert "difference of +0.0000" in refused["error"]["message"]
    assert production(loaded_platform) == 1
    assert "promotions" not in loaded_platform.registry.get("tiny-chat@2").extra
    denied = loaded_platform.audit.query(action="model.alias.promote")[0]
    assert denied.outcome == "denied" and denied.detail["decision"]["better"] is False

    # only an admin may override, and the decision says it did
    acme = key_for(loaded_platform, "acme")
    code, answer = promote(served, {"target": "tiny-chat@2", "eval": comparison, "override": True}, acme)
    assert (code, answer["error"]["param"]) == (403, "override")
    code, moved = promote(served, {"target": "tiny-chat@2", "eval": comparison, "override": True})
    assert code == 200 and production(loaded_platform) == 2
    assert moved["promotion"]["better"] is False and moved["promotion"]["overridden"] is True
    assert loaded_platform.registry.get("tiny-chat@2").extra["promotions"][-1]["overridden"] is True


def test_promotions_without_a_fitting_eval_are_refused_and_nothing_changes(
    served: TestClient, loaded_platform: Platform
) -> None:
    eval_id = make_eval(served)
    baseline = run(served, eval_id, "tiny-chat@1")
    candidate = run(served, eval_id, "tiny-chat@2")
    fewer = run(served, eval_id, "tiny-chat@2", ITEMS[:20])
    by_alias = run(served, eval_id, "tiny-chat@production")
    good = {"eval_id": eval_id, "candidate_run": candidate, "baseline_run": baseline}
    given = served.post(  # answers that came with the items: no model gave them here
        f"/v1/evals/{eval_id}/runs",
        json={
            "data_source": {
                "type": "jsonl",
                "source": {"type": "file_content", "content": [{**i, "sample": {"output_text": "x"}} for i in ITEMS]},
            }
        },
        headers=ADMIN,
    ).json()["id"]
    cases: list[tuple[dict[str, Any], int, str, str | None]] = [
        ({"target": "tiny-chat@2"}, 400, "eval", "promotion_needs_eval"),
        ({"target": "tiny-chat@2", "eval": "eval_x"}, 400, "eval", None),
        ({"target": "tiny-chat@2", "eval": {**good, "candidate_run": None}}, 400, "eval.candidate_run", None),
        ({"target": "tiny-chat@2", "eval": {**good, "runs": 2}}, 400, "eval.runs", None),
        ({"target": "tiny-chat@2", "eval": good, "override": "yes"}, 400, "override", None),
        ({"eval": good}, 400, "target", None),
        ({"target": "tiny-chat@2", "eval": good, "force": True}, 400, "force", None),
        ({"target": "tiny-chat@2", "eval": {**good, "eval_id": "eval_nope"}}, 404, "eval.eval_id", None),
        ({"target": "tiny-chat@2", "eval": {**good, "candidate_run": "evalrun_nope"}}, 404, "eval.candidate_run", None),
        ({"target": "no-such-model", "eval": good}, 404, "target", "model_not_found"),
        ({"target": "tiny-chat@1", "eval": good}, 400, "target", None),  # already production's
        ({"target": "tiny-embed", "eval": good}, 400, "eval.candidate_run", "eval_model_mismatch"),
        # the runs the other way round: the candidate run is not of the candidate
        ({"target": "tiny-chat@2", "eval": {**good, "candidate_run": baseline, "baseline_run": candidate}}, 400,
         "eval.candidate_run", "eval_model_mismatch"),
        ({"target": "tiny-chat@2", "eval": {**good, "baseline_run": candidate}}, 400, "eval.baseline_run", None),
        ({"target": "tiny-chat@2", "eval": {**good, "candidate_run": fewer}}, 400, "eval.baseline_run",
         "eval_items_differ"),
        ({"target": "tiny-chat@2", "eval": {**good, "candidate_run": given}}, 400, "eval.candidate_run", None),
        ({"target": "tiny-chat@2", "eval": {**good, "criterion": "nope"}}, 400, "eval.criterion", "eval_items_differ"),
    ]  # fmt: skip
    for body, status, param, code in cases:
        answer = served.post(PROMOTE, json=body, headers=ADMIN)
        error = answer.json()["error"]
        assert (answer.status_code, error["param"]) == (status, param), (body, error)
        if code is not None:
            assert error["code"] == code, (body, error)
    other = served.post(
        "/v1/model_aliases/tiny-chat@staging/promote", json={"target": "tiny-chat@2", "eval": good}, headers=ADMIN
    )
    assert (other.status_code, other.json()["error"]["param"]) == (404, "model")  # no such alias

    # a run of the alias counts only while the alias stays as it was when the run began
    canary = {"canaries": [{"target": "tiny-chat@2", "weight": 10}]}
    assert served.post("/v1/model_aliases/tiny-chat@production/canary", json=canary, headers=ADMIN).status_code == 200
    code, answer = promote(served, {"target": "tiny-chat@2", "eval": {**good, "baseline_run": by_alias}})
    assert (code, answer["error"]["param"], answer["error"]["code"]) == (
        400,
        "eval.baseline_run",
        "eval_model_mismatch",
    )

    assert production(loaded_platform) == 1
    assert "promotions" not in loaded_platform.registry.get("tiny-chat@2").extra
    assert loaded_platform.audit.query(action="model.alias.promote") == []
