"""The HTTP API in-process, driven by the official openai client over Starlette's TestClient."""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient

from llmos.platform import Platform
from tests.conftest import ADMIN_KEY

CHAT = [{"role": "user", "content": "Hello"}]


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN_KEY}"}


def assert_error(resp: object, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text  # type: ignore[attr-defined]
    body = resp.json()["error"]  # type: ignore[attr-defined]
    assert set(body) == {"message", "type", "param", "code"}
    assert body["message"]
    if param is not None:
        assert body["param"] == param
    if code is not None:
        assert body["code"] == code
    return body


def test_models_list_carries_registry_fields(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny-chat", "tiny-embed"}
    chat = models["tiny-chat"]
    assert chat.object == "model" and chat.owned_by == "system" and chat.created > 0
    assert chat.task == "chat" and chat.version == 1 and chat.size_bytes > 0  # type: ignore[attr-defined]
    assert client.models.retrieve("tiny-embed").task == "embedding"  # type: ignore[attr-defined]


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="tiny-chat", messages=CHAT, temperature=0, max_tokens=5)  # type: ignore[arg-type]
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 5


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny-chat",
        messages=CHAT,
        temperature=0,
        max_tokens=6,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="tiny-chat", messages=CHAT, temperature=0, max_tokens=6)  # type: ignore[arg-type]
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_raw_sse_ends_with_done(http: TestClient) -> None:
    with http.stream(
        "POST",
        "/v1/chat/completions",
        headers=auth(),
        json={"model": "tiny-chat", "messages": CHAT, "stream": True, "max_tokens": 3},
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    json.loads(lines[0].removeprefix("data: "))


def test_logprobs_and_n(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="tiny-chat",
        messages=CHAT,
        n=2,
        seed=3,
        temperature=1,  # type: ignore[arg-type]
        max_tokens=4,
        logprobs=True,
        top_logprobs=3,
    )
    assert [c.index for c in r.choices] == [0, 1]
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content and len(content[0].top_logprobs) == 3
    assert content[0].logprob <= 0


def test_completions_with_echo_and_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="tiny-chat", prompt=["Hello", "The sea"], max_tokens=3, temperature=0, logprobs=2, echo=True
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text.startswith("Hello")
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs is not None
    assert lp.token_logprobs[0] is None  # the echoed prompt's first token: nothing comes before it
    assert "".join(lp.tokens) == r.choices[0].text  # the prompt's tokens, then the generated ones


def test_embeddings_float_base64_and_dimensions(client: openai.OpenAI, http: TestClient) -> None:
    r = client.embeddings.create(model="tiny-embed", input=["hello world", "the sea"])
    assert [d.index for d in r.data] == [0, 1] and len(r.data[0].embedding) == 32
    assert r.usage.prompt_tokens > 0
    raw = http.post(
        "/v1/embeddings",
        headers=auth(),
        json={"model": "tiny-embed", "input": "hello world", "encoding_format": "base64"},
    ).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, r.data[0].embedding, atol=1e-6)
    short = client.embeddings.create(model="tiny-embed", input="hello world", dimensions=8)
    assert len(short.data[0].embedding) == 8
    assert abs(np.linalg.norm(short.data[0].embedding) - 1) < 1e-5


# -- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_KEY}, {"Authorization": "Basic abc"}]
)
def test_requests_without_a_valid_key_get_401(http: TestClient, headers: dict[str, str]) -> None:
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/completions"),
        ("GET", "/v1/models/tiny-chat"),
        ("DELETE", "/v1/models/tiny-chat"),
    ]:
        resp = http.request(method, path, headers=headers, json={"model": "tiny-chat", "messages": CHAT})
        assert_error(resp, 401)


def test_key_in_query_string_is_not_accepted(http: TestClient) -> None:
    assert_error(http.get(f"/v1/models?api_key={ADMIN_KEY}"), 401)


def test_revoked_and_scoped_keys(http: TestClient, loaded_platform: Platform) -> None:
    info, key = loaded_platform.keys.create("app", scopes=("inference",))
    headers = {"Authorization": f"Bearer {key}"}
    assert http.get("/v1/models", headers=headers).status_code == 200
    assert_error(http.delete("/v1/models/tiny-chat", headers=headers), 403)  # deleting needs admin
    loaded_platform.keys.revoke(info.id)
    assert_error(http.get("/v1/models", headers=headers), 401, code="revoked_api_key")


def test_health_and_ready_are_open(http: TestClient) -> None:
    assert http.get("/health").json()["status"] == "ok"
    assert http.get("/ready").json()["status"] == "ready"


# -- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 99}, "n"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"max_tokens": 250}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user"}]}, None),
        ({"messages": [{"role": "wizard", "content": "x"}]}, None),
        ({"messages": "hello"}, "messages"),
        ({"temperature": "hot"}, "temperature"),
        ({"n": 1.5}, "n"),
        ({"stop": ["a"] * 10}, "stop"),
        ({"top_logprobs": 50, "logprobs": True}, "top_logprobs"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"model": 7}, "model"),
    ],
)
def test_invalid_chat_parameters_get_400(http: TestClient, change: dict, param: str | None) -> None:
    body = {"model": "tiny-chat", "messages": CHAT, **change}
    err = assert_error(http.post("/v1/chat/completions", headers=auth(), json=body), 400, param=param)
    assert err["type"] == "invalid_request_error"


def test_messages_with_missing_content_are_rejected_by_template_or_schema(http: TestClient) -> None:
    resp = http.post("/v1/chat/completions", headers=auth(), json={"model": "tiny-chat", "messages": [{}]})
    assert_error(resp, 400)


def test_prompt_longer_than_context_is_400_not_truncated(http: TestClient) -> None:
    long = "Hello world " * 400  # the tiny model's context is 256 tokens
    resp = http.post(
        "/v1/chat/completions",
        headers=auth(),
        json={"model": "tiny-chat", "messages": [{"role": "user", "content": long}]},
    )
    assert_error(resp, 400, param="messages", code="context_length_exceeded")


def test_unknown_model_is_404(client: openai.OpenAI, http: TestClient) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="no-such-model", messages=CHAT)  # type: ignore[arg-type]
    assert exc.value.code == "model_not_found"
    assert_error(http.get("/v1/models/no-such-model", headers=auth()), 404, code="model_not_found")
    assert_error(http.post("/v1/embeddings", headers=auth(), json={"model": "nope", "input": "x"}), 404)


def test_wrong_model_kind_is_400(http: TestClient) -> None:
    assert_error(
        http.post("/v1/embeddings", headers=auth(), json={"model": "tiny-chat", "input": "x"}), 400, param="model"
    )
    assert_error(
        http.post("/v1/chat/completions", headers=auth(), json={"model": "tiny-embed", "messages": CHAT}),
        400,
        param="model",
    )


def test_oversized_body_is_413(http: TestClient, loaded_platform: Platform) -> None:
    big = "x" * (loaded_platform.settings.max_body_bytes + 10)
    resp = http.post(
        "/v1/embeddings",
        headers=auth(),
        content=json.dumps({"model": "tiny-embed", "input": big}),
    )
    assert_error(resp, 413)


def test_deeply_nested_json_is_400(http: TestClient) -> None:
    body = '{"model": "tiny-chat", "messages": ' + "[" * 5000 + "]" * 5000 + "}"
    resp = http.post("/v1/chat/completions", headers={**auth(), "content-type": "application/json"}, content=body)
    assert_error(resp, 400)


def test_malformed_json_is_400(http: TestClient) -> None:
    resp = http.post(
        "/v1/chat/completions", headers={**auth(), "content-type": "application/json"}, content=b"{not json"
    )
    assert_error(resp, 400)


def test_embedding_inputs_too_long_or_empty(http: TestClient) -> None:
    assert_error(
        http.post("/v1/embeddings", headers=auth(), json={"model": "tiny-embed", "input": "word " * 500}),
        400,
        code="context_length_exceeded",
    )
    assert_error(http.post("/v1/embeddings", headers=auth(), json={"model": "tiny-embed", "input": []}), 400)
    assert_error(
        http.post("/v1/embeddings", headers=auth(), json={"model": "tiny-embed", "input": "x", "dimensions": 1000}),
        400,
        param="dimensions",
    )


def test_unknown_route_is_openai_shaped_404(http: TestClient) -> None:
    assert_error(http.get("/v1/nothing-here", headers=auth()), 404)


def test_delete_model(client: openai.OpenAI) -> None:
    deleted = client.models.delete("tiny-embed")
    assert deleted.deleted and deleted.id == "tiny-embed"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("tiny-embed")
