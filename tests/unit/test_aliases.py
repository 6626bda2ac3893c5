"""Model aliases: ``name@alias`` wherever a model is named, set, moved and deleted by an admin or
the line's owner, audited; foreign targets and targets of another task refused, nothing changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.platform import Platform
from llmos.registry.records import Lineage
from tests.conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
HELLO = [{"role": "user", "content": "Hello"}]


def key_for(platform: Platform, tenant: str) -> dict[str, str]:
    platform.tenants.create(tenant)
    _, secret = platform.keys.create(f"{tenant}-ops", tenant=tenant, scopes=("inference", "models"))
    return {"Authorization": f"Bearer {secret}"}


def set_alias(http: TestClient, headers: dict[str, str], **body: str) -> tuple[int, dict]:
    r = http.post("/v1/model_aliases", json=body, headers=headers)
    return r.status_code, r.json()


def aliases(loaded_platform: Platform) -> list[tuple[str, str]]:
    return [(a.ref, a.model_id) for a in loaded_platform.registry.aliases.list()]


def test_an_alias_names_a_version_everywhere_and_moves_with_an_audit_trail(
    http: TestClient, client: openai.OpenAI, loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    first = loaded_platform.registry.get("tiny-chat@1")
    code, made = set_alias(http, ADMIN, model="tiny-chat", alias="staging", target="tiny-chat@1")
    assert code == 200 and made["id"] == "tiny-chat@staging" and made["target"]["root"] == "tiny-chat@1"
    changed = shutil.copytree(tiny_chat_dir, tmp_path / "v2")
    (changed / "notes.txt").write_text("the second version")  # other content: a new version, not the same one
    second = loaded_platform.registry.pull(f"file:{changed}", name="tiny-chat")
    assert second.version == 2

    # chat, completions and the model object all take the alias; the plain name is the newest version
    r = client.chat.completions.create(model="tiny-chat@staging", messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert r.choices[0].message.content is not None and r.model == "tiny-chat@1"  # the version that answered
    client.completions.create(model="tiny-chat@staging", prompt="Hi", max_tokens=2)
    assert client.models.retrieve("tiny-chat@staging").version == 1  # type: ignore[attr-defined]
    assert client.models.retrieve("tiny-chat").version == 2  # type: ignore[attr-defined]
    assert client.models.retrieve("tiny-chat@1").aliases == ["tiny-chat@staging"]  # type: ignore[attr-defined]
    code, _ = set_alias(http, ADMIN, model="tiny-embed", alias="stable", target="tiny-embed")
    assert code == 200
    assert len(client.embeddings.create(model="tiny-embed@stable", input="hi").data) == 1

    code, moved = set_alias(http, ADMIN, model="tiny-chat", alias="staging", target="tiny-chat@2")
    assert code == 200 and moved["target"]["root"] == "tiny-chat@2"
    assert client.models.retrieve("tiny-chat@staging").version == 2  # type: ignore[attr-defined]
    listed = http.get("/v1/model_aliases", params={"model": "tiny-chat"}, headers=ADMIN).json()["data"]
    assert [(a["id"], a["target"]["root"]) for a in listed] == [("tiny-chat@staging", "tiny-chat@2")]

    trail = [(e.action, e.target, e.detail) for e in loaded_platform.audit.query(action="model.alias.set")]
    assert trail[::-1][0] == ("model.alias.set", "tiny-chat@staging", {"from": None, "to": first.id})
    assert ("model.alias.set", "tiny-chat@staging", {"from": first.id, "to": second.id}) in trail

    r2 = http.delete("/v1/model_aliases/tiny-chat@staging", headers=ADMIN)
    assert r2.status_code == 200 and r2.json()["deleted"] is True
    assert loaded_platform.audit.query(action="model.alias.delete")[0].detail == {"from": second.id}
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="tiny-chat@staging", messages=HELLO, max_tokens=2)  # type: ignore[arg-type]
    assert http.delete("/v1/model_aliases/tiny-chat@staging", headers=ADMIN).status_code == 404


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": "tiny-chat", "alias": "prod", "target": "tiny-embed"}, 400, "target", "alias_task_mismatch"),
        ({"model": "tiny-chat", "alias": "1st", "target": "tiny-chat"}, 400, "alias", None),
        ({"model": "tiny-chat", "alias": "has space", "target": "tiny-chat"}, 400, "alias", None),
        ({"model": "tiny-chat", "alias": "a" * 65, "target": "tiny-chat"}, 400, "alias", None),
        ({"model": "tiny-chat", "alias": "prod", "target": "nope"}, 404, "target", "model_not_found"),
        ({"model": "tiny-chat", "alias": "prod"}, 400, "target", None),
        ({"model": "tiny-chat", "alias": "prod", "target": "tiny-chat", "owner": "x"}, 400, "owner", None),
        ({"model": "bad name!", "alias": "prod", "target": "tiny-chat"}, 400, "name", None),
    ],
)
def test_bad_aliases_are_refused_and_nothing_changes(
    http: TestClient, loaded_platform: Platform, body: dict, status: int, param: str, code: str | None
) -> None:
    answer = http.post("/v1/model_aliases", json=body, headers=ADMIN)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert aliases(loaded_platform) == []


def test_aliases_stay_inside_their_tenant(
    http: TestClient, loaded_platform: Platform, tiny_chat_dir: Path, tiny_encoder_dir: Path
) -> None:
    acme, bob = key_for(loaded_platform, "acme"), key_for(loaded_platform, "bob")
    own = loaded_platform.registry.pull(f"file:{tiny_chat_dir}", name="acme-bot", lineage=Lineage(owner="acme"))
    loaded_platform.registry.pull(f"file:{tiny_encoder_dir}", name="acme-embed", lineage=Lineage(owner="acme"))
    code, made = set_alias(http, acme, model="acme-bot", alias="production", target="acme-bot")
    assert code == 200 and made["owned_by"] == "acme"
    code, _ = set_alias(http, acme, model="acme-line", alias="production", target="tiny-chat")  # a shared target
    assert code == 200
    before = aliases(loaded_platform)

    refusals = [
        (acme, {"model": "tiny-chat", "alias": "production", "target": "acme-bot"}, 403, "model"),  # a shared line
        (bob, {"model": "acme-bot", "alias": "production", "target": "tiny-chat"}, 404, "model"),  # another's line
        (bob, {"model": "bob-bot", "alias": "production", "target": "acme-bot"}, 404, "target"),  # another's model
        (ADMIN, {"model": "tiny-chat", "alias": "production", "target": "acme-bot"}, 400, "target"),  # foreign
        (acme, {"model": "acme-bot", "alias": "production", "target": "acme-embed"}, 400, "target"),  # task
    ]
    for headers, body, status, param in refusals:
        answer = http.post("/v1/model_aliases", json=body, headers=headers)
        assert (answer.status_code, answer.json()["error"]["param"]) == (status, param), body
    assert http.delete("/v1/model_aliases/acme-bot@production", headers=bob).status_code == 404
    assert aliases(loaded_platform) == before

    chat = {"messages": HELLO, "max_tokens": 2}
    assert http.post("/v1/chat/completions", json={"model": "acme-bot@production", **chat}, headers=acme).is_success
    answer = http.post("/v1/chat/completions", json={"model": "acme-bot@production", **chat}, headers=bob)
    assert answer.status_code == 404 and answer.json()["error"]["param"] == "model"
    assert http.get("/v1/model_aliases", headers=bob).json()["data"] == []
    shown = http.get("/v1/models/acme-bot", headers=acme).json()
    assert shown["aliases"] == ["acme-bot@production"] and shown["id"] == own.name
    assert http.get("/v1/models/tiny-chat", headers=bob).json()["aliases"] == []  # acme's line is not shown


def test_a_fine_tuning_job_takes_an_alias_as_its_base_and_a_feedback_export_as_its_data(
    quiet_http: TestClient, quiet_client: openai.OpenAI, loaded_platform: Platform
) -> None:
    code, _ = set_alias(quiet_http, ADMIN, model="tiny-chat", alias="production", target="tiny-chat@1")
    assert code == 200
    answer = quiet_client.chat.completions.create(
        model="tiny-chat@production",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=2,
        store=True,
    )
    given = quiet_http.post(
        f"/v1/chat/completions/{answer.id}/feedback", json={"correction": "Hello to you."}, headers=ADMIN
    )
    assert given.status_code == 200
    exported = quiet_http.post("/v1/feedback/exports", json={"format": "sft"}, headers=ADMIN).json()
    job = quiet_client.fine_tuning.jobs.create(model="tiny-chat@production", training_file=exported["id"])
    assert job.status == "queued"
    assert loaded_platform.jobs.get("default", job.id).base_model_id == loaded_platform.registry.get("tiny-chat@1").id
