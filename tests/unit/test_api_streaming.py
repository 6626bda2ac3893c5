"""Streamed chat and completion events on the tiny model: the shapes of the official ``openai``
package's types, the same text and usage as the whole response, and ``[DONE]`` last."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletionChunk

from tests.conftest import ADMIN_KEY

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 5, "temperature": 0}
USAGE_KEYS = {"prompt_tokens", "completion_tokens", "total_tokens", "completion_tokens_details"}


def events(http: TestClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", path, headers=AUTH, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        data = [line.removeprefix("data: ") for line in resp.iter_lines() if line]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


def test_chat_chunks_are_openai_chunks_and_add_up_to_the_whole_answer(http: TestClient) -> None:
    body = {**CHAT, "n": 2, "logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}}
    chunks = events(http, "/v1/chat/completions", body)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)  # the official type accepts every one
        assert chunk["object"] == "chat.completion.chunk" and "usage" in chunk
        assert (chunk["id"], chunk["created"]) == (chunks[0]["id"], chunks[0]["created"])
    *streamed, last = chunks
    assert last["choices"] == [] and set(last["usage"]) == USAGE_KEYS
    assert all(chunk["usage"] is None and len(chunk["choices"]) == 1 for chunk in streamed)
    choices = [chunk["choices"][0] for chunk in streamed]
    assert [c["delta"] for c in choices[:2]] == [{"role": "assistant", "content": "", "refusal": None}] * 2
    content = [c for c in choices[2:] if c["finish_reason"] is None]
    assert content and all(set(c["delta"]) == {"content"} for c in content)
    with_logprobs = [c["logprobs"] for c in content if c["logprobs"] is not None]
    assert with_logprobs and all(set(lp) == {"content", "refusal"} and lp["content"] for lp in with_logprobs)
    finished = [c for c in choices if c["finish_reason"] is not None]
    assert sorted(c["index"] for c in finished) == [0, 1] and all(c["delta"] == {} for c in finished)

    whole = http.post("/v1/chat/completions", headers=AUTH, json=body).json()
    for i, choice in enumerate(whole["choices"]):
        assert "".join(c["delta"]["content"] for c in content if c["index"] == i) == choice["message"]["content"]
    assert last["usage"] == whole["usage"]


def test_chat_chunks_carry_no_usage_unless_asked(http: TestClient) -> None:
    chunks = events(http, "/v1/chat/completions", CHAT)
    assert all("usage" not in chunk and chunk["choices"] for chunk in chunks)
    assert all(chunk["choices"][0]["logprobs"] is None for chunk in chunks)


def test_completion_chunks_echo_then_add_up_to_the_whole_answer(http: TestClient) -> None:
    body = {
        "model": "tiny-chat",
        "prompt": "The sea",
        "max_tokens": 4,
        "temperature": 0,
        "n": 2,
        "echo": True,
        "logprobs": 1,
        "stream_options": {"include_usage": True},
    }
    chunks = events(http, "/v1/completions", body)
    *streamed, last = chunks
    assert last["choices"] == [] and set(last["usage"]) == USAGE_KEYS
    for chunk in streamed:
        assert chunk["object"] == "text_completion" and chunk["usage"] is None
        assert set(chunk["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    choices = [chunk["choices"][0] for chunk in streamed]
    # Each choice opens with the echo and the prompt's logprobs (the first token's null).
    assert [(c["index"], c["text"]) for c in choices[:2]] == [(0, "The sea"), (1, "The sea")]
    assert all(c["logprobs"]["tokens"] == ["The", " sea"] for c in choices[:2])
    assert all(c["logprobs"]["token_logprobs"][0] is None for c in choices[:2])
    with_logprobs = [c["logprobs"] for c in choices[2:] if c["logprobs"] is not None]
    assert with_logprobs and all(
        set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"} for lp in with_logprobs
    )

    whole = http.post("/v1/completions", headers=AUTH, json=body).json()
    for i, choice in enumerate(whole["choices"]):
        assert "".join(c["text"] for c in choices if c["index"] == i) == choice["text"]
        assert [c["finish_reason"] for c in choices if c["index"] == i][-1] == choice["finish_reason"]
    assert last["usage"] == whole["usage"]
