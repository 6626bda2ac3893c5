"""Moderation: POST /v1/moderations through the official client (a classification model's labels
mapped to OpenAI's categories, a tenant's blocked terms), and a tenant's policy refusing chat
completions whose input or answer it flags, counted in the metrics and the audit log."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from llmos.api import create_app
from llmos.platform import Platform
from llmos.registry.moderation import CATEGORIES, category_named
from tests.conftest import ADMIN_KEY
from tests.unit.test_alert_outputs import TEXTS, build_tiny_classifier
from tests.unit.test_batches import jsonl, output_lines, wait_for

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
POLICY = "/v1/admin/tenants/default/moderation"


def relabelled(directory: Path, labels: tuple[str, str]) -> Path:
    """The tiny two-label classifier with its labels renamed (its first label is the 'negative' half)."""
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    config["id2label"] = {"0": labels[0], "1": labels[1]}
    config["label2id"] = {labels[0]: 0, labels[1]: 1}
    config_file.write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def classifier_dirs(tiny_encoder_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two classifiers: `tiny-mod` (labels harassment, safe) and `tiny-toxic` (toxic, ok)."""
    root = tmp_path_factory.mktemp("moderation-models")
    return {
        name: relabelled(build_tiny_classifier(tiny_encoder_dir, root / name), labels)
        for name, labels in (("tiny-mod", ("harassment", "safe")), ("tiny-toxic", ("toxic", "ok")))
    }


@pytest.fixture
def moderated(loaded_platform: Platform, classifier_dirs: dict[str, Path]) -> Iterator[TestClient]:
    for name, directory in classifier_dirs.items():
        loaded_platform.registry.pull(f"file:{directory}", name=name)
    with TestClient(create_app(platform=loaded_platform)) as http:
        yield http


def client_of(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=http, max_retries=0)


def harassment_probabilities(http: TestClient) -> dict[str, float]:
    resp = http.post("/v1/classifications", headers=AUTH, json={"model": "tiny-mod", "input": TEXTS})
    assert resp.status_code == 200, resp.text
    return {
        text: next(s["score"] for s in row["scores"] if s["label"] == "harassment")
        for text, row in zip(TEXTS, resp.json()["data"], strict=True)
    }


def put_policy(http: TestClient, **policy: Any) -> dict[str, Any]:
    resp = http.put(POLICY, headers=AUTH, json=policy)
    assert resp.status_code == 200, resp.text
    return resp.json()


def error_of(resp: Any, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    error: dict[str, Any] = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_label_names_map_to_openai_categories() -> None:
    assert category_named("self_harm_intent") == "self-harm/intent"
    assert category_named("Violence-Graphic") == "violence/graphic"
    assert category_named("HATE") == "hate"
    assert category_named("safe") is None and category_named("harass") is None
    assert len({category_named(c) for c in CATEGORIES}) == len(CATEGORIES)


def test_the_official_client_gets_scores_of_the_model_mapped_to_categories(moderated: TestClient) -> None:
    expected = harassment_probabilities(moderated)
    result = client_of(moderated).moderations.create(model="tiny-mod", input=TEXTS)
    assert result.model == "tiny-mod" and result.id.startswith("modr-")
    flagged = []
    for text, verdict in zip(TEXTS, result.results, strict=True):
        assert verdict.category_scores.harassment == pytest.approx(expected[text], abs=1e-5)
        assert verdict.categories.harassment is (expected[text] >= 0.5)
        assert verdict.flagged is verdict.categories.harassment
        assert verdict.category_scores.hate == 0.0 and verdict.categories.hate is False
        assert verdict.category_applied_input_types.harassment == ["text"]
        assert verdict.category_applied_input_types.hate == []
        flagged.append(verdict.flagged)
    assert any(flagged) and not all(flagged)  # the tiny model splits the texts: both kinds are seen

    one = client_of(moderated).moderations.create(model="tiny-mod", input=[{"type": "text", "text": TEXTS[0]}])
    assert one.results[0].category_scores.harassment == pytest.approx(expected[TEXTS[0]], abs=1e-3)


def test_a_policy_sets_the_model_threshold_label_map_and_blocked_terms(moderated: TestClient) -> None:
    client = client_of(moderated)
    with pytest.raises(openai.BadRequestError) as refused:  # no label of tiny-toxic names a category
        client.moderations.create(model="tiny-toxic", input="hello")
    assert refused.value.body["param"] == "model"  # type: ignore[index]

    expected = harassment_probabilities(moderated)
    put_policy(moderated, model="tiny-toxic", threshold=0.9, label_map={"toxic": "hate"},
               blocked_terms={"violence": ["punch", "kick him"]})  # fmt: skip
    result = client.moderations.create(input=TEXTS)  # the policy's model
    assert result.model == "tiny-toxic"
    for text, verdict in zip(TEXTS, result.results, strict=True):
        # tiny-toxic is tiny-mod's weights: its 'toxic' is tiny-mod's 'harassment', here counted as hate
        assert verdict.category_scores.hate == pytest.approx(expected[text], abs=1e-5)
        assert verdict.categories.hate is (expected[text] >= 0.9)
        assert verdict.category_scores.harassment == 0.0
    terms = client.moderations.create(
        input=["I will PUNCH you", "a punchline", "then kick him twice", "kick them"], model="tiny-toxic"
    )
    assert [v.categories.violence for v in terms.results] == [True, False, True, False]
    assert terms.results[0].category_scores.violence == 1.0
    assert terms.results[0].category_applied_input_types.violence == ["text"]

    shown = moderated.get(POLICY, headers=AUTH).json()
    assert shown["blocked_terms"] == {"violence": ["kick him", "punch"]} and shown["threshold"] == 0.9
    assert moderated.delete(POLICY, headers=AUTH).status_code == 200
    error_of(moderated.get(POLICY, headers=AUTH), 404)


def flagged_and_clean(http: TestClient) -> tuple[str, str]:
    probabilities = harassment_probabilities(http)
    return max(probabilities, key=probabilities.__getitem__), min(probabilities, key=probabilities.__getitem__)


def blocked_count(stage: str, category: str) -> float:
    labels = {"stage": stage, "category": category}
    return REGISTRY.get_sample_value("llmos_moderation_blocked_total", labels) or 0.0


def test_a_tenant_policy_refuses_flagged_chat_input(moderated: TestClient) -> None:
    bad, good = flagged_and_clean(moderated)
    put_policy(moderated, model="tiny-mod", check_input=True)
    before = blocked_count("input", "harassment")
    body = {"model": "tiny-chat", "max_tokens": 3, "messages": [{"role": "system", "content": bad}]}
    assert moderated.post("/v1/chat/completions", headers=AUTH, json=body).status_code == 200  # not a user's
    body["messages"] = [{"role": "user", "content": good}, {"role": "user", "content": bad}]
    error = error_of(moderated.post("/v1/chat/completions", headers=AUTH, json=body), 400)
    assert error["code"] == "content_policy_violation" and error["param"] == "messages"
    assert "harassment" in error["message"]
    assert blocked_count("input", "harassment") == before + 1
    (event,) = moderated.get("/v1/admin/audit", headers=AUTH, params={"action": "moderation.block"}).json()["data"]
    assert event["outcome"] == "denied" and event["detail"] == {"stage": "input", "categories": ["harassment"]}
    assert bad not in json.dumps(event)  # the audit log keeps the categories, not the text

    body["messages"] = [{"role": "user", "content": good}]
    assert moderated.post("/v1/chat/completions", headers=AUTH, json=body).status_code == 200


def test_a_tenant_policy_refuses_flagged_answers_and_does_not_store_them(moderated: TestClient) -> None:
    # An answer the model alone does not flag at the policy's threshold (tiny-mod is confident
    # on about half of all texts), so that only the blocked term below flags it.
    for seed in range(8):
        body = {"model": "tiny-chat", "max_tokens": 12, "temperature": 1.0, "seed": seed, "store": True,
                "messages": [{"role": "user", "content": "hello there"}]}  # fmt: skip
        answer = moderated.post("/v1/chat/completions", headers=AUTH, json=body).json()["choices"][0]["message"]
        model_score = client_of(moderated).moderations.create(model="tiny-mod", input=answer["content"]).results[0]
        if model_score.category_scores.harassment < 0.99 and re.search(r"\w", answer["content"]):
            break
    else:
        pytest.fail("no answer of eight that tiny-mod scores below 0.99")
    answer = answer["content"]
    word = max(re.findall(r"\w+", answer), key=len)  # a word of the answer, blocked below
    put_policy(moderated, model="tiny-mod", check_output=True, threshold=0.999, blocked_terms={"illicit": [word]})
    before = blocked_count("output", "illicit")
    stored = len(moderated.get("/v1/chat/completions", headers=AUTH).json()["data"])

    error = error_of(moderated.post("/v1/chat/completions", headers=AUTH, json=body), 400)
    assert error["code"] == "content_policy_violation" and error["param"] is None
    assert blocked_count("output", "illicit") == before + 1
    assert len(moderated.get("/v1/chat/completions", headers=AUTH).json()["data"]) == stored
    error = error_of(moderated.post("/v1/chat/completions", headers=AUTH, json={**body, "stream": True}), 400)
    assert error["param"] == "stream"

    put_policy(moderated, model="tiny-mod", check_output=True, threshold=0.999, blocked_terms={"illicit": ["zzzz"]})
    assert (
        moderated.post("/v1/chat/completions", headers=AUTH, json=body).json()["choices"][0]["message"]["content"]
        == answer
    )


BAD_REQUESTS: list[tuple[dict[str, Any], int, str | None]] = [
    ({"input": "hi"}, 400, "model"),  # no model anywhere
    ({"input": "hi", "model": "tiny-embed"}, 400, "model"),
    ({"input": "hi", "model": "no-such"}, 404, "model"),
    ({"input": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}], "model": "tiny-mod"}, 400, "input"),
    ({"input": ["hi", " "], "model": "tiny-mod"}, 400, "input"),
    ({"input": [], "model": "tiny-mod"}, 400, "input"),
    ({"input": "hi", "model": "tiny-mod", "user": "u1"}, 400, "user"),
]
BAD_POLICIES: list[tuple[dict[str, Any], str]] = [
    ({"model": "tiny-mod", "blocked_terms": {"rudeness": ["x"]}}, "blocked_terms"),
    ({"model": "tiny-mod", "blocked_terms": {"hate": [" "]}}, "blocked_terms"),
    ({"model": "tiny-mod", "label_map": {"toxic": "toxicity"}}, "label_map"),
    ({"model": "tiny-mod", "threshold": 0}, "threshold"),
    ({"model": "tiny-mod", "threshold": 1.5}, "threshold"),
    ({"check_input": True}, "model"),
    ({"model": "tiny-mod", "owner": "someone"}, "owner"),
]


def test_bad_requests_and_policies_are_refused_and_nothing_is_stored(moderated: TestClient) -> None:
    for body, status, param in BAD_REQUESTS:
        error = error_of(moderated.post("/v1/moderations", headers=AUTH, json=body), status)
        assert error["param"] == param, body
    for policy, param in BAD_POLICIES:
        error = error_of(moderated.put(POLICY, headers=AUTH, json=policy), 400)
        assert error["param"] == param, policy
        error_of(moderated.get(POLICY, headers=AUTH), 404)


def test_policies_of_unknown_tenants_and_models_are_404(moderated: TestClient) -> None:
    error_of(moderated.put("/v1/admin/tenants/nobody/moderation", headers=AUTH, json={}), 404)
    error_of(moderated.put(POLICY, headers=AUTH, json={"model": "no-such"}), 404)
    error_of(moderated.get(POLICY, headers=AUTH), 404)


def test_a_tenant_policy_binds_the_chat_lines_of_its_batches(moderated: TestClient) -> None:
    bad, good = flagged_and_clean(moderated)
    put_policy(moderated, model="tiny-mod", check_input=True)
    client = client_of(moderated)
    lines = [
        {"custom_id": name, "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "tiny-chat", "max_tokens": 2, "messages": [{"role": "user", "content": text}]}}
        for name, text in (("clean", good), ("flagged", bad))
    ]  # fmt: skip
    upload = client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch").id
    created = client.batches.create(input_file_id=upload, endpoint="/v1/chat/completions", completion_window="24h")
    batch = wait_for(client, created.id, lambda b: b.status == "completed")
    assert [o["custom_id"] for o in output_lines(client, batch.output_file_id)] == ["clean"]
    (refused,) = output_lines(client, batch.error_file_id)
    assert refused["custom_id"] == "flagged" and refused["response"]["status_code"] == 400
    assert refused["response"]["body"]["error"]["code"] == "content_policy_violation"
