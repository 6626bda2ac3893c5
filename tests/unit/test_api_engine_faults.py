"""API behaviour when the engine fails, with a fake engine (no model at all)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.engine import FinishReason, GenerationDelta
from llmos.errors import ServiceUnavailableError
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.fake_engine import FakeEngine

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}


def failing_engine() -> FakeEngine:
    """Streams one token, then reports a failed generation; its health check fails."""
    return FakeEngine(
        deltas=(
            GenerationDelta(index=0, text="Hel", token_ids=(5,)),
            GenerationDelta(index=0, text="", finish_reason=FinishReason.ERROR, error="boom in sampling"),
        ),
        health_error=RuntimeError("engine down"),
    )


@pytest.fixture
def http(loaded_platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform=loaded_platform, engine=failing_engine())) as client:
        yield client


def test_failed_generation_is_a_500_in_openai_shape(http: TestClient) -> None:
    resp = http.post("/v1/chat/completions", headers=AUTH, json=BODY)
    assert resp.status_code == 500
    assert resp.json()["error"]["code"] == "engine_error"
    assert "boom in sampling" in resp.json()["error"]["message"]


def test_failed_stream_ends_with_an_error_event(http: TestClient) -> None:
    with http.stream("POST", "/v1/chat/completions", headers=AUTH, json={**BODY, "stream": True}) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert '"error"' in lines[-1] and "boom in sampling" in lines[-1]
    assert "[DONE]" not in lines[-1]


def test_ready_reports_an_unhealthy_engine(http: TestClient) -> None:
    resp = http.get("/ready")
    assert resp.status_code == 503
    assert resp.json()["status"] == "unavailable"
    assert http.get("/health").status_code == 200


def test_a_full_engine_refuses_before_any_work(loaded_platform: Platform) -> None:
    # At capacity: every request must be refused before the engine is asked for anything else.
    engine = FakeEngine(
        capacity_error=ServiceUnavailableError("the server is at capacity; retry shortly", retry_after=1.0)
    )
    with TestClient(create_app(platform=loaded_platform, engine=engine)) as client:
        for path, body in (
            ("/v1/chat/completions", BODY),
            ("/v1/completions", {"model": "tiny-chat", "prompt": "hi"}),
            ("/v1/embeddings", {"model": "tiny-embed", "input": "hi"}),
        ):
            resp = client.post(path, headers=AUTH, json=body)
            assert resp.status_code == 503, path
            assert resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["code"] == "overloaded"
    assert engine.calls == []  # no tokenising, no model lookup: the refusal costs nothing


def test_a_healthy_engine_serves_and_receives_the_request(loaded_platform: Platform) -> None:
    engine = FakeEngine()
    with TestClient(create_app(platform=loaded_platform, engine=engine)) as client:
        resp = client.post("/v1/chat/completions", headers=AUTH, json={**BODY, "max_tokens": 7, "temperature": 0})
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "Hello"
        assert client.get("/ready").status_code == 200
    (request,) = engine.requests
    assert request.model == "tiny-chat" and request.params.max_tokens == 7 and request.params.greedy
    assert list(request.prompt_token_ids) == [3]  # what encode_chat gave for the one message
    assert engine.closed  # the app shut its engine down with it
