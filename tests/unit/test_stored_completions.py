"""Stored chat completions through the official ``openai`` client: store, list with filters,
retrieve, update, delete, messages; per tenant; retention; bad input refused with nothing stored."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.kernel.maintenance import run_maintenance
from llmos.platform import Platform

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]


def client_for(http: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


def tenant_client(http: TestClient, platform: Platform, tenant: str) -> openai.OpenAI:
    platform.tenants.create(tenant)
    _, secret = platform.keys.create(f"{tenant}-app", tenant=tenant, scopes=("inference", "files"))
    return client_for(http, secret)


def ask(client: openai.OpenAI, **extra: object) -> str:
    fields: dict = {"model": "tiny-chat", "temperature": 0, "max_tokens": 4, **extra}
    return client.chat.completions.create(messages=HELLO, **fields).id  # type: ignore[arg-type]


def test_a_stored_completion_is_listed_retrieved_updated_and_deleted(client: openai.OpenAI) -> None:
    first = ask(client, store=True, metadata={"topic": "greeting", "user": "u1"})
    second = ask(client, store=True, metadata={"topic": "other"})
    ask(client)  # not stored: store defaults to false
    ask(client, metadata={"topic": "greeting"})  # metadata alone does not store either

    stored = client.chat.completions.retrieve(first)
    assert stored.id == first and stored.model == "tiny-chat" and stored.object == "chat.completion"
    assert stored.metadata == {"topic": "greeting", "user": "u1"}
    assert stored.choices[0].message.content is not None and stored.usage is not None

    assert [c.id for c in client.chat.completions.list()] == [first, second]
    assert [c.id for c in client.chat.completions.list(order="desc")] == [second, first]
    assert [c.id for c in client.chat.completions.list(metadata={"topic": "greeting"})] == [first]
    assert [c.id for c in client.chat.completions.list(metadata={"topic": "greeting", "user": "u2"})] == []
    assert client.chat.completions.list(model="tiny-embed").data == []
    page = client.chat.completions.list(limit=1)
    assert [c.id for c in page.data] == [first] and page.has_more
    # iterating the page follows ``after`` through every page
    assert [c.id for c in client.chat.completions.list(limit=1)] == [first, second]

    messages = client.chat.completions.messages.list(first)
    assert [(m.role, m.content) for m in messages.data] == [("system", "Be brief."), ("user", "Hello")]  # type: ignore[comparison-overlap]
    assert [m.id for m in messages.data] == [f"{first}-0", f"{first}-1"]
    assert [m.content for m in client.chat.completions.messages.list(first, order="desc", limit=1).data] == ["Hello"]

    updated = client.chat.completions.update(first, metadata={"topic": "reviewed"})
    assert updated.metadata == {"topic": "reviewed"}
    assert [c.id for c in client.chat.completions.list(metadata={"topic": "reviewed"})] == [first]

    deleted = client.chat.completions.delete(first)
    assert (deleted.id, deleted.deleted, deleted.object) == (first, True, "chat.completion.deleted")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(first)
    assert [c.id for c in client.chat.completions.list()] == [second]


def test_a_streamed_completion_is_stored_as_its_chunks_add_up(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=HELLO,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=5,
        stream=True,
        store=True,
        metadata={"via": "stream"},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    stored = client.chat.completions.retrieve(chunks[0].id)
    assert stored.choices[0].message.content == text
    assert stored.choices[0].finish_reason in ("stop", "length")
    assert stored.usage is not None and stored.usage.completion_tokens >= 1
    assert stored.metadata == {"via": "stream"}


@pytest.mark.parametrize(
    ("metadata", "param"),
    [
        ({f"k{i}": "v" for i in range(17)}, "metadata"),
        ({"k" * 65: "v"}, "metadata"),
        ({"k": "v" * 513}, "metadata.k"),
        ({"k": 3}, "metadata.k"),
        ("not-an-object", "metadata"),
    ],
)
def test_bad_metadata_is_refused_and_nothing_is_stored(client: openai.OpenAI, metadata: object, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, store=True, metadata=metadata)
    assert err.value.body["param"] == param  # type: ignore[index]
    assert err.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert client.chat.completions.list().data == []


def test_bad_updates_and_list_filters_change_nothing(client: openai.OpenAI, http: TestClient) -> None:
    first = ask(client, store=True, metadata={"topic": "greeting"})
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.update(first, metadata={"k": "v" * 600})
    assert err.value.body["param"] == "metadata.k"  # type: ignore[index]
    headers = {"Authorization": f"Bearer {client.api_key}"}
    r = http.post(f"/v1/chat/completions/{first}", json={"metadata": {}, "model": "x"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = http.get("/v1/chat/completions", params={"metadata": "topic"}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "metadata"
    assert client.chat.completions.retrieve(first).metadata == {"topic": "greeting"}


def test_another_tenants_stored_completion_does_not_exist(http: TestClient, loaded_platform: Platform) -> None:
    alice = tenant_client(http, loaded_platform, "alice")
    bob = tenant_client(http, loaded_platform, "bob")
    secret = ask(alice, store=True, metadata={"owner": "alice"})
    assert bob.chat.completions.list().data == []
    for call in (
        lambda: bob.chat.completions.retrieve(secret),
        lambda: bob.chat.completions.update(secret, metadata={"owner": "bob"}),
        lambda: bob.chat.completions.delete(secret),
        lambda: bob.chat.completions.messages.list(secret),
        lambda: bob.chat.completions.retrieve("chatcmpl-000000000000000000000000"),
        lambda: bob.chat.completions.retrieve("../../etc"),
    ):
        with pytest.raises(openai.NotFoundError) as err:
            call()
        assert err.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert alice.chat.completions.retrieve(secret).metadata == {"owner": "alice"}


def test_maintenance_deletes_completions_past_their_retention(client: openai.OpenAI, loaded_platform: Platform) -> None:
    kept = ask(client, store=True)
    settings = loaded_platform.settings.model_copy(update={"completion_retention_days": 30})
    platform = dataclasses.replace(loaded_platform, settings=settings)
    soon = datetime.now(UTC) + timedelta(days=29)
    assert run_maintenance(platform, now=soon.timestamp())["stored_completions"] == 0
    assert client.chat.completions.retrieve(kept).id == kept
    later = datetime.now(UTC) + timedelta(days=31)
    assert run_maintenance(platform, now=later.timestamp())["stored_completions"] == 1
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.retrieve(kept)
    forever = dataclasses.replace(
        loaded_platform, settings=settings.model_copy(update={"completion_retention_days": 0})
    )
    ask(client, store=True)
    assert run_maintenance(forever, now=(later + timedelta(days=900)).timestamp())["stored_completions"] == 0


def test_the_model_filter_finds_completions_made_through_an_alias(
    client: openai.OpenAI, loaded_platform: Platform
) -> None:
    registry = loaded_platform.registry
    registry.aliases.set("tiny-chat", "production", registry.get("tiny-chat"), tenant="default", admin=True)
    by_alias = ask(client, store=True, model="tiny-chat@production")
    by_name = ask(client, store=True)
    assert client.chat.completions.retrieve(by_alias).model == "tiny-chat@1"  # stored as the version that answered

    assert [c.id for c in client.chat.completions.list(model="tiny-chat")] == [by_alias, by_name]
    assert [c.id for c in client.chat.completions.list(model="tiny-chat@1")] == [by_alias]
    assert client.chat.completions.list(model="tiny").data == []  # a name's prefix is another model
    assert client.chat.completions.list(model="tiny-chat@2").data == []
