"""Canaries and rollback: an alias splits its requests by weight across versions, each end user
sticking to one; responses, stored completions and metrics name the version that answered; a
rollback ends a canary or returns to the previous target; bad splits are refused, nothing changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.monitoring import metrics
from llmos.platform import Platform
from llmos.registry.records import Lineage, ModelRecord
from tests.conftest import ADMIN_KEY
from tests.unit.test_aliases import key_for, set_alias

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
HELLO = [{"role": "user", "content": "Hello"}]


def second_version(platform: Platform, tiny_chat_dir: Path, tmp_path: Path, name: str = "tiny-chat") -> ModelRecord:
    changed = shutil.copytree(tiny_chat_dir, tmp_path / f"{name}-v2")
    (changed / "notes.txt").write_text("the second version")  # other content: a new version, not the same one
    owner = platform.registry.get(name).owner
    return platform.registry.pull(f"file:{changed}", name=name, lineage=Lineage(owner=owner))


def set_canaries(http: TestClient, ref: str, canaries: object, headers: dict[str, str] = ADMIN) -> tuple[int, dict]:
    r = http.post(f"/v1/model_aliases/{ref}/canary", json={"canaries": canaries}, headers=headers)
    return r.status_code, r.json()


def routed(platform: Platform, user: str | None, ref: str = "tiny-chat@production", tenant: str = "default") -> str:
    return platform.registry.aliases.route(ref, tenant=tenant, user=user)


def latency_count(model_name: str) -> float:
    return metrics.REGISTRY.get_sample_value("llmos_e2e_request_latency_seconds_count", {"model_name": model_name}) or 0


def test_a_canary_splits_requests_by_end_user_and_a_rollback_ends_it(
    http: TestClient,
    client: openai.OpenAI,
    loaded_platform: Platform,
    tiny_chat_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # model_name values are capped per process: this test's two start a cap of their own
    monkeypatch.setattr(metrics, "MODEL_NAMES", metrics.LabelCap(metrics.MODEL_NAMES.limit, metrics.OTHER_MODEL))
    first = loaded_platform.registry.get("tiny-chat@1")
    second = second_version(loaded_platform, tiny_chat_dir, tmp_path)
    assert set_alias(http, ADMIN, model="tiny-chat", alias="production", target="tiny-chat@1")[0] == 200

    code, shown = set_canaries(http, "tiny-chat@production", [{"target": "tiny-chat@2", "weight": 30}])
    assert code == 200, shown
    assert shown["target"]["root"] == "tiny-chat@1" and shown["target"]["weight"] == 70
    assert [(c["target"]["root"], c["weight"]) for c in shown["canaries"]] == [("tiny-chat@2", 30)]
    canary = loaded_platform.audit.query(action="model.alias.canary")[0]
    assert (canary.target, canary.detail) == ("tiny-chat@production", {"from": {}, "to": {second.id: 30}})

    # about 30% of end users go to the canary, each always to the same version
    users = [f"user-{i}" for i in range(1000)]
    picks = {user: routed(loaded_platform, user) for user in users}
    on_canary = {user for user, ref in picks.items() if ref == "tiny-chat@2"}
    assert set(picks.values()) == {"tiny-chat@1", "tiny-chat@2"}
    assert 250 <= len(on_canary) <= 350
    assert all(routed(loaded_platform, user) == picks[user] for user in users[:50])
    # the split is the same through the API, which names the version that answered
    stable_user = next(u for u in users if u not in on_canary)
    canary_user = next(iter(sorted(on_canary)))
    before = {ref: latency_count(ref) for ref in ("tiny-chat@1", "tiny-chat@2")}
    for user, expected in ((stable_user, "tiny-chat@1"), (canary_user, "tiny-chat@2"), (canary_user, "tiny-chat@2")):
        answer = client.chat.completions.create(
            model="tiny-chat@production",
            messages=HELLO,  # type: ignore[arg-type]
            max_tokens=2,
            user=user,
            store=True,
        )
        assert answer.model == expected
        assert client.chat.completions.retrieve(answer.id).model == expected
    # per-version metrics: each version behind the alias has its own series
    assert latency_count("tiny-chat@1") == before["tiny-chat@1"] + 1
    assert latency_count("tiny-chat@2") == before["tiny-chat@2"] + 2
    streamed = client.chat.completions.create(
        model="tiny-chat@production",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=2,
        user=canary_user,
        stream=True,
    )
    assert {chunk.model for chunk in streamed} == {"tiny-chat@2"}
    assert client.completions.create(
        model="tiny-chat@production", prompt="Hi", max_tokens=2, user=canary_user
    ).model == ("tiny-chat@2")

    # raising the canary's weight keeps the users it had and adds others
    assert set_canaries(http, "tiny-chat@production", [{"target": "tiny-chat@2", "weight": 60}])[0] == 200
    grown = {user for user in users if routed(loaded_platform, user) == "tiny-chat@2"}
    assert on_canary < grown and 550 <= len(grown) <= 650

    # the model object and everything resolving without an end user see the alias's own target
    assert client.models.retrieve("tiny-chat@production").version == 1  # type: ignore[attr-defined]

    # a rollback ends the canary: every user back on the target, audited
    r = http.post("/v1/model_aliases/tiny-chat@production/rollback", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["canaries"] == [] and r.json()["target"]["root"] == "tiny-chat@1"
    assert {routed(loaded_platform, user) for user in users} == {"tiny-chat@1"}
    event = loaded_platform.audit.query(action="model.alias.rollback")[0]
    assert event.detail == {"from": first.id, "to": first.id, "canaries_ended": {second.id: 60}}
    answer = client.chat.completions.create(
        model="tiny-chat@production",
        messages=HELLO,  # type: ignore[arg-type]
        max_tokens=2,
        user=canary_user,
    )
    assert answer.model == "tiny-chat@1"

    # without a user, the tenant as a whole sticks to one version
    assert set_canaries(http, "tiny-chat@production", [{"target": "tiny-chat@2", "weight": 50}])[0] == 200
    alone = {routed(loaded_platform, None) for _ in range(5)}
    assert len(alone) == 1
    # moving the alias ends its canary too
    assert set_alias(http, ADMIN, model="tiny-chat", alias="production", target="tiny-chat@1")[0] == 200
    assert loaded_platform.registry.aliases.get("tiny-chat", "production").canaries == ()  # type: ignore[union-attr]


def test_a_rollback_returns_through_the_history_of_targets(
    http: TestClient, loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    first = loaded_platform.registry.get("tiny-chat@1")
    second = second_version(loaded_platform, tiny_chat_dir, tmp_path)
    for target in ("tiny-chat@1", "tiny-chat@2"):
        assert set_alias(http, ADMIN, model="tiny-chat", alias="staging", target=target)[0] == 200
    shown = http.get("/v1/model_aliases/tiny-chat@staging", headers=ADMIN).json()
    assert [(h["target"]["root"], h["rolled_back"]) for h in shown["history"]] == [
        ("tiny-chat@2", False),
        ("tiny-chat@1", False),
    ]

    r = http.post("/v1/model_aliases/tiny-chat@staging/rollback", headers=ADMIN)
    assert r.status_code == 200 and r.json()["target"]["root"] == "tiny-chat@1"
    assert loaded_platform.registry.get("tiny-chat@staging").id == first.id
    assert loaded_platform.audit.query(action="model.alias.rollback")[0].detail == {"from": second.id, "to": first.id}
    shown = http.get("/v1/model_aliases/tiny-chat@staging", headers=ADMIN).json()
    assert [(h["target"]["root"], h["rolled_back"]) for h in shown["history"]] == [
        ("tiny-chat@2", True),
        ("tiny-chat@1", False),
    ]

    # nothing before the first target: 409, nothing changed
    r = http.post("/v1/model_aliases/tiny-chat@staging/rollback", headers=ADMIN)
    assert r.status_code == 409 and r.json()["error"]["code"] == "no_rollback_target"
    assert loaded_platform.registry.get("tiny-chat@staging").id == first.id
    assert len(loaded_platform.audit.query(action="model.alias.rollback")) == 1
    r = http.post("/v1/model_aliases/tiny-chat@staging/rollback", json={"to": "tiny-chat@2"}, headers=ADMIN)
    assert (r.status_code, r.json()["error"]["param"]) == (400, "to")

    # a deleted version leaves the history: a rollback never returns to it
    assert set_alias(http, ADMIN, model="tiny-chat", alias="staging", target="tiny-chat@2")[0] == 200
    loaded_platform.registry.delete("tiny-chat@1")
    assert http.post("/v1/model_aliases/tiny-chat@staging/rollback", headers=ADMIN).status_code == 409
    assert loaded_platform.registry.get("tiny-chat@staging").id == second.id


@pytest.mark.parametrize(
    ("canaries", "status", "param"),
    [
        ({"target": "tiny-chat@2", "weight": 10}, 400, "canaries"),
        ([{"target": "tiny-chat@2", "weight": 0}], 400, "canaries[0].weight"),
        ([{"target": "tiny-chat@2", "weight": 100}], 400, "canaries[0].weight"),
        ([{"target": "tiny-chat@2", "weight": "10"}], 400, "canaries[0].weight"),
        ([{"target": "tiny-chat@2", "weight": True}], 400, "canaries[0].weight"),
        ([{"target": "tiny-chat@2"}], 400, "canaries[0].weight"),
        ([{"weight": 10}], 400, "canaries[0].target"),
        ([{"target": "tiny-chat@2", "weight": 10, "sticky": "user"}], 400, "canaries[0].sticky"),
        (["tiny-chat@2"], 400, "canaries[0]"),
        ([{"target": "tiny-chat@1", "weight": 10}], 400, "canaries[0].target"),  # the alias's own target
        ([{"target": "tiny-chat@2", "weight": 10}, {"target": "tiny-chat@2", "weight": 5}], 400, "canaries[1].target"),
        ([{"target": "tiny-chat@2", "weight": 60}, {"target": "tiny-chat@3", "weight": 40}], 400, "canaries"),
        ([{"target": "tiny-embed", "weight": 10}], 400, "canaries[0].target"),  # another task
        ([{"target": "no-such-model", "weight": 10}], 404, "canaries[0].target"),
        ([{"target": "tiny-chat@2", "weight": 1}] * 9, 400, "canaries"),
    ],
)
def test_bad_canaries_are_refused_and_nothing_changes(
    http: TestClient,
    loaded_platform: Platform,
    tiny_chat_dir: Path,
    tmp_path: Path,
    canaries: object,
    status: int,
    param: str,
) -> None:
    second_version(loaded_platform, tiny_chat_dir, tmp_path)
    changed = shutil.copytree(tiny_chat_dir, tmp_path / "v3")
    (changed / "notes.txt").write_text("the third version")
    loaded_platform.registry.pull(f"file:{changed}", name="tiny-chat")
    assert set_alias(http, ADMIN, model="tiny-chat", alias="staging", target="tiny-chat@1")[0] == 200
    code, answer = set_canaries(http, "tiny-chat@staging", canaries)
    assert (code, answer["error"]["param"]) == (status, param), answer
    assert loaded_platform.registry.aliases.get("tiny-chat", "staging").canaries == ()  # type: ignore[union-attr]
    assert loaded_platform.audit.query(action="model.alias.canary") == []


def test_canaries_and_rollbacks_stay_inside_their_tenant(
    http: TestClient, loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    acme, bob = key_for(loaded_platform, "acme"), key_for(loaded_platform, "bob")
    loaded_platform.registry.pull(f"file:{tiny_chat_dir}", name="acme-bot", lineage=Lineage(owner="acme"))
    second_version(loaded_platform, tiny_chat_dir, tmp_path, name="acme-bot")
    bob_bot = loaded_platform.registry.pull(f"file:{tiny_chat_dir}", name="bob-bot", lineage=Lineage(owner="bob"))
    assert set_alias(http, acme, model="acme-bot", alias="production", target="acme-bot@1")[0] == 200
    assert set_alias(http, ADMIN, model="tiny-chat", alias="production", target="tiny-chat")[0] == 200

    wanted = [{"target": "acme-bot@2", "weight": 10}]
    assert set_canaries(http, "acme-bot@production", wanted, bob)[0] == 404  # another tenant's alias
    assert http.post("/v1/model_aliases/acme-bot@production/rollback", headers=bob).status_code == 404
    assert http.get("/v1/model_aliases/acme-bot@production", headers=bob).status_code == 404
    assert set_canaries(http, "tiny-chat@production", wanted, acme)[0] == 403  # a shared line: admins only
    code, answer = set_canaries(http, "acme-bot@production", [{"target": "bob-bot", "weight": 10}], acme)
    assert (code, answer["error"]["param"]) == (404, "canaries[0].target")  # bob's model is not acme's to see
    code, answer = set_canaries(http, "acme-bot@production", [{"target": bob_bot.id, "weight": 10}], ADMIN)
    assert (code, answer["error"]["code"]) == (400, "alias_foreign_model")
    assert loaded_platform.audit.query(action="model.alias.canary") == []

    assert set_canaries(http, "acme-bot@production", wanted, acme)[0] == 200
    chat = {"model": "acme-bot@production", "messages": HELLO, "max_tokens": 2}
    refused = http.post("/v1/chat/completions", json=chat, headers=bob)
    assert refused.status_code == 404 and "acme-bot@production" in refused.json()["error"]["message"]
    users = {routed(loaded_platform, f"u{i}", "acme-bot@production", "acme"): f"u{i}" for i in range(200)}
    assert set(users) == {"acme-bot@1", "acme-bot@2"}
    for version, user in users.items():
        answer = http.post("/v1/chat/completions", json={**chat, "user": user}, headers=acme)
        assert answer.json()["model"] == version


def test_a_gated_alias_moves_only_by_promotion(
    http: TestClient, loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    second_version(loaded_platform, tiny_chat_dir, tmp_path)
    assert set_alias(http, ADMIN, model="tiny-chat", alias="production", target="tiny-chat@1")[0] == 200
    code, answer = set_alias(http, ADMIN, model="tiny-chat", alias="production", target="tiny-chat@2")
    assert (code, answer["error"]["param"], answer["error"]["code"]) == (400, "eval", "promotion_needs_eval")
    assert loaded_platform.registry.get("tiny-chat@production").version == 1
    assert set_alias(http, ADMIN, model="tiny-chat", alias="production", target="tiny-chat@1")[0] == 200  # no move
    assert set_alias(http, ADMIN, model="tiny-chat", alias="staging", target="tiny-chat@2")[0] == 200  # not gated
