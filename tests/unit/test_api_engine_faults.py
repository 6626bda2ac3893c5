"""API behaviour when the engine fails, with a fake engine (no model at all)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator

import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.engine import EmbeddingResult, FinishReason, GenerationDelta, GenerationRequest, ModelInfo
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
BODY = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}


class FailingEngine:
    """Streams one token, then reports a failed generation."""

    def __init__(self) -> None:
        self.aborted: list[str] = []

    async def model_info(self, model: str) -> ModelInfo:
        return ModelInfo(name=model, task="chat", context_length=128, has_chat_template=True)

    async def encode_chat(self, model: str, messages: list[dict[str, str]]) -> list[int]:
        return [1, 2, 3]

    async def encode_text(self, model: str, text: str) -> list[int]:
        return [1, 2, 3]

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        yield GenerationDelta(index=0, text="Hel", token_ids=(5,))
        yield GenerationDelta(index=0, text="", finish_reason=FinishReason.ERROR, error="boom in sampling")

    async def embed(self, model: str, inputs: list[str] | list[list[int]]) -> EmbeddingResult:
        raise NotImplementedError

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def check_capacity(self) -> None:
        return None

    async def check_health(self) -> None:
        raise RuntimeError("engine down")

    async def shutdown(self) -> None:
        return None


@pytest.fixture
def http(loaded_platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform=loaded_platform, engine=FailingEngine())) as client:
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


class FullEngine(FailingEngine):
    """At capacity: every request must be refused before the engine is asked for anything else."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def check_capacity(self) -> None:
        from llmos.errors import ServiceUnavailableError

        raise ServiceUnavailableError("the server is at capacity; retry shortly", retry_after=1.0)

    async def encode_chat(self, model: str, messages: list[dict[str, str]]) -> list[int]:
        self.asked.append("encode_chat")
        return [1]

    async def model_info(self, model: str) -> ModelInfo:
        self.asked.append("model_info")
        return await super().model_info(model)


def test_a_full_engine_refuses_before_any_work(loaded_platform: Platform) -> None:
    engine = FullEngine()
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
    assert engine.asked == []  # no tokenising, no model lookup: the refusal costs nothing
