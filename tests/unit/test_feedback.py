"""Feedback on stored completions and the datasets exported from it (SFT and DPO files in the
files API, deduplicated, with lineage); bad input and other tenants' completions refused."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.platform import Platform
from llmos.registry.tables import FeedbackRow, FileRow
from tests.unit.test_stored_completions import ask, tenant_client


def give(http: TestClient, client: openai.OpenAI, completion_id: str, **body: object) -> dict:
    r = http.post(
        f"/v1/chat/completions/{completion_id}/feedback",
        json=body,
        headers={"Authorization": f"Bearer {client.api_key}"},
    )
    assert r.status_code == 200, r.text
    return r.json()


def export(http: TestClient, client: openai.OpenAI, **body: object) -> tuple[int, dict]:
    r = http.post("/v1/feedback/exports", json=body, headers={"Authorization": f"Bearer {client.api_key}"})
    return r.status_code, r.json()


def rows(platform: Platform, table: type) -> int:
    with platform.db.session() as s:
        return s.query(table).count()


def test_feedback_is_recorded_with_who_gave_it_and_listed_by_filter(
    http: TestClient, client: openai.OpenAI, loaded_platform: Platform
) -> None:
    first = ask(client, store=True)
    second = ask(client, store=True)
    up = give(http, client, first, rating="up", tags=["tone", "greeting"], comment="fine")
    five = give(http, client, second, rating=5)
    fixed = give(http, client, second, rating="down", correction="Hi there!", tags=["wrong"])
    assert up["object"] == "chat.completion.feedback" and up["completion_id"] == first
    assert (up["rating"], up["score"], up["tags"], up["comment"]) == ("up", 1.0, ["greeting", "tone"], "fine")
    assert (five["rating"], five["score"]) == (5, 1.0)
    assert (fixed["score"], fixed["correction"]) == (0.0, "Hi there!")
    admin_key_id = loaded_platform.keys.verify(client.api_key).id
    assert up["created_by"] == {"tenant": "default", "key_id": admin_key_id}

    headers = {"Authorization": f"Bearer {client.api_key}"}
    listed = http.get("/v1/feedback", headers=headers).json()
    assert [f["id"] for f in listed["data"]] == [up["id"], five["id"], fixed["id"]]
    by_completion = http.get("/v1/feedback", params={"completion_id": second}, headers=headers).json()
    assert [f["id"] for f in by_completion["data"]] == [five["id"], fixed["id"]]
    by_tag = http.get("/v1/feedback", params=[("tag", "wrong"), ("tag", "tone")], headers=headers).json()
    assert [f["id"] for f in by_tag["data"]] == [up["id"], fixed["id"]]
    assert [f["id"] for f in http.get("/v1/feedback", params={"rating": "5"}, headers=headers).json()["data"]] == [
        five["id"]
    ]
    paged = http.get("/v1/feedback", params={"limit": 1, "after": up["id"]}, headers=headers).json()
    assert [f["id"] for f in paged["data"]] == [five["id"]] and paged["has_more"]

    client.chat.completions.delete(second)  # its feedback goes with it
    assert [f["id"] for f in http.get("/v1/feedback", headers=headers).json()["data"]] == [up["id"]]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"rating": 6}, "rating"),
        ({"rating": "meh"}, "rating"),
        ({"rating": True}, "rating"),
        ({"tags": ["has space"]}, "tags"),
        ({"tags": [f"t{i}" for i in range(17)]}, "tags"),
        ({"correction": ""}, "correction"),
        ({"comment": "x" * 2049}, "comment"),
        ({"rating": "up", "choice_index": 3}, "choice_index"),
        ({"rating": "up", "tenant": "other"}, "tenant"),
        ({}, "rating"),
    ],
)
def test_bad_feedback_is_refused_and_nothing_is_written(
    http: TestClient, client: openai.OpenAI, loaded_platform: Platform, body: dict, param: str
) -> None:
    completion = ask(client, store=True)
    r = http.post(
        f"/v1/chat/completions/{completion}/feedback", json=body, headers={"Authorization": f"Bearer {client.api_key}"}
    )
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"
    assert rows(loaded_platform, FeedbackRow) == 0


def test_feedback_on_another_tenants_or_an_unknown_completion_is_404(
    http: TestClient, loaded_platform: Platform
) -> None:
    alice = tenant_client(http, loaded_platform, "alice")
    bob = tenant_client(http, loaded_platform, "bob")
    hers = ask(alice, store=True)
    unstored = ask(alice)
    for completion in (hers, unstored, "chatcmpl-ffffffffffffffffffffffff"):
        r = http.post(
            f"/v1/chat/completions/{completion}/feedback",
            json={"rating": "down", "correction": "mine now"},
            headers={"Authorization": f"Bearer {bob.api_key}"},
        )
        assert r.status_code == 404 and r.json()["error"]["param"] == "completion_id"
    assert rows(loaded_platform, FeedbackRow) == 0
    give(http, alice, hers, rating="up")
    assert http.get("/v1/feedback", headers={"Authorization": f"Bearer {bob.api_key}"}).json()["data"] == []
    code, body = export(http, bob, format="sft")
    assert code == 400 and body["error"]["code"] == "empty_export"


def test_exports_write_deduplicated_sft_and_dpo_files_with_their_lineage(
    http: TestClient, client: openai.OpenAI, loaded_platform: Platform
) -> None:
    # Sampled with one seed, so that the tiny random model answers more than white space, the same each time.
    sampled = {"temperature": 1.0, "seed": 7, "store": True}
    good = ask(client, **sampled, metadata={"app": "a"})
    twin = ask(client, **sampled, metadata={"app": "a"})  # the same prompt and answer
    wrong = ask(client, **sampled, metadata={"app": "a"})
    other_app = ask(client, **sampled, metadata={"app": "b"})
    unrated = ask(client, **sampled, metadata={"app": "a"})
    f_good = give(http, client, good, rating="up")
    f_twin = give(http, client, twin, rating=4)
    f_wrong = give(http, client, wrong, rating="down", tags=["fix"])
    f_fix = give(http, client, wrong, correction="Hello! How can I help?", tags=["fix"])
    give(http, client, other_app, rating="up")
    give(http, client, unrated, comment="no verdict here")
    answer = client.chat.completions.retrieve(good).choices[0].message.content
    assert answer and answer.strip() and client.chat.completions.retrieve(twin).choices[0].message.content == answer

    code, sft = export(http, client, format="sft", metadata={"app": "a"})
    assert code == 200, sft
    assert (sft["object"], sft["purpose"], sft["status"], sft["format"], sft["records"]) == (
        "file",
        "fine-tune",
        "processed",
        "chat",
        2,
    )
    lines = [json.loads(x) for x in client.files.content(sft["id"]).text.splitlines()]
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert lines == [
        {"messages": [*prompt, {"role": "assistant", "content": answer}]},
        {"messages": [*prompt, {"role": "assistant", "content": "Hello! How can I help?"}]},
    ]
    lineage = sft["lineage"]
    assert lineage["source"] == "feedback" and lineage["filters"]["metadata"] == {"app": "a"}
    assert lineage["lines"] == [
        {"line": 1, "completion_ids": [good, twin], "feedback_ids": [f_good["id"], f_twin["id"]]},
        {"line": 2, "completion_ids": [wrong], "feedback_ids": [f_wrong["id"], f_fix["id"]]},
    ]
    assert client.files.retrieve(sft["id"]).id == sft["id"]  # an ordinary file of the files API

    code, dpo = export(http, client, format="dpo", tags=["fix"])
    assert code == 200 and (dpo["status"], dpo["format"], dpo["records"]) == ("processed", "preference", 1)
    (pair,) = [json.loads(x) for x in client.files.content(dpo["id"]).text.splitlines()]
    assert pair == {
        "input": {"messages": prompt},
        "preferred_output": [{"role": "assistant", "content": "Hello! How can I help?"}],
        "non_preferred_output": [{"role": "assistant", "content": answer}],
    }
    assert dpo["lineage"]["lines"][0]["completion_ids"] == [wrong]

    code, only_b = export(http, client, format="sft", model="tiny-chat", metadata={"app": "b"})
    assert code == 200 and only_b["records"] == 1
    files_before = rows(loaded_platform, FileRow)
    code, body = export(http, client, format="sft", created_after=2**36)  # feedback from the far future only
    assert code == 400 and body["error"]["code"] == "empty_export"
    code, body = export(http, client, format="sft", model="tiny-embed")
    assert code == 400 and body["error"]["code"] == "empty_export"
    assert rows(loaded_platform, FileRow) == files_before


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"format": "csv"}, "format"),
        ({"format": "sft", "metadata": {"k": 1}}, "metadata.k"),
        ({"format": "sft", "tags": "fix"}, "tags"),
        ({"format": "sft", "created_after": "yesterday"}, "created_after"),
        ({"format": "sft", "min_score": 2}, "min_score"),
        ({"format": "sft", "purpose": "batch"}, "purpose"),
    ],
)
def test_bad_exports_are_refused_and_write_no_file(
    http: TestClient, client: openai.OpenAI, loaded_platform: Platform, body: dict, param: str
) -> None:
    give(http, client, ask(client, store=True), rating="up")
    code, answer = export(http, client, **body)
    assert code == 400 and answer["error"]["param"] == param
    assert rows(loaded_platform, FileRow) == 0
