"""Every field of OpenAI's request types is honoured or refused (400 naming it), as the table
in docs/api.md says: the test walks the ``openai`` package's TypedDicts, so a field a new
release adds fails here until the table (and the server) takes a side."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openai.types import completion_create_params, embedding_create_params
from openai.types.chat import completion_create_params as chat_create_params

from llmos.api.openai.chat.schemas import ChatCompletionRequest
from llmos.api.openai.completions.schemas import CompletionRequest
from llmos.api.openai.embeddings.schemas import EmbeddingRequest
from tests.conftest import ADMIN_KEY

API_DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
ENDPOINTS: dict[str, tuple[Any, Any, dict[str, Any]]] = {
    "/v1/chat/completions": (
        chat_create_params.CompletionCreateParamsBase,
        ChatCompletionRequest,
        {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    ),
    "/v1/completions": (
        completion_create_params.CompletionCreateParamsBase,
        CompletionRequest,
        {"model": "tiny-chat", "prompt": "Hi", "max_tokens": 2},
    ),
    "/v1/embeddings": (
        embedding_create_params.EmbeddingCreateParams,
        EmbeddingRequest,
        {"model": "tiny-embed", "input": "Hi"},
    ),
}
# A value of the right shape for each refused field (the server must refuse it anyway).
REFUSED_SAMPLES: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"},
    "function_call": "auto",
    "functions": [{"name": "f", "parameters": {"type": "object"}}],
    "logit_bias": {"5": 10},
    "modalities": ["text"],
    "moderation": True,
    "prompt_cache_key": "k",
    "prompt_cache_options": {},
    "prompt_cache_retention": "24h",
    "reasoning_effort": "low",
    "safety_identifier": "u1",
    "service_tier": "auto",
    "verbosity": "low",
    "web_search_options": {},
    "best_of": 2,
    "suffix": "!",
}


def _table() -> dict[str, tuple[set[str], set[str]]]:
    text = API_DOC.read_text()
    section = text.split("## Request fields", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[set[str], set[str]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`POST "):
            endpoint = cells[0].strip("`").removeprefix("POST ")
            honoured, refused = (set(re.findall(r"`([a-z_]+)`", c)) for c in cells[1:])
            rows[endpoint] = (honoured, refused)
    return rows


def test_the_table_covers_every_field_of_the_openai_request_types() -> None:
    table = _table()
    for endpoint, (typed, model, _) in ENDPOINTS.items():
        honoured, refused = table[endpoint]
        fields = set(typed.__annotations__) | (
            {"stream"} if "messages" in typed.__annotations__ or "prompt" in typed.__annotations__ else set()
        )
        assert not honoured & refused, endpoint
        assert fields - honoured - refused == set(), f"{endpoint}: fields the table does not place"
        assert honoured <= set(model.model_fields), f"{endpoint}: honoured fields the server does not read"
        assert not refused & set(model.model_fields), f"{endpoint}: refused fields the server reads"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_the_server_refuses_what_the_table_refuses_naming_the_field(http: TestClient, endpoint: str) -> None:
    _, _, base = ENDPOINTS[endpoint]
    _, refused = _table()[endpoint]
    for field in sorted(refused):
        r = http.post(endpoint, headers=AUTH, json={**base, field: REFUSED_SAMPLES[field]})
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"]["param"] == field
        assert field in r.json()["error"]["message"]
    # Null asks for nothing: accepted, as in the assistant messages clients echo back.
    assert http.post(endpoint, headers=AUTH, json={**base, "logit_bias": None}).status_code == 200
    if endpoint == "/v1/chat/completions":
        echoed = {"role": "assistant", "content": "Hello", "refusal": None, "audio": None, "function_call": None}
        body = {**base, "messages": [*base["messages"], echoed, {"role": "user", "content": "Again"}]}
        assert http.post(endpoint, headers=AUTH, json=body).status_code == 200
        body = {**base, "messages": [{"role": "user", "content": "Hi", "cache_control": {"type": "x"}}]}
        r = http.post(endpoint, headers=AUTH, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].cache_control"
