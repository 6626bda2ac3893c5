"""No 500 from any input: integers in references and cursors are range-checked, and the JSON depth
limit holds for every body whatever its content type and for every line of an uploaded file."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from jinja2 import TemplateError

from llmos.engine.models import Resolution, encode_chat
from llmos.engine.protocol import ModelHandle
from llmos.errors import InvalidRequestError
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TOO_BIG = "12345678901234567890"  # beyond a 64-bit column
DEEP = 100_000  # far past the interpreter's recursion limit


def assert_400(response: object, param: str | None = None) -> dict:
    assert response.status_code == 400, response.text  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    return error


def test_model_versions_beyond_a_column_are_400(http: TestClient, loaded_platform: Platform) -> None:
    for ref in (f"tiny-chat@{TOO_BIG}", "tiny-chat@9223372036854775808", "tiny-chat@²", "tiny-chat@-1"):
        assert_400(http.get(f"/v1/models/{ref}", headers=ADMIN), "model")
    chat = {"model": f"tiny-chat@{TOO_BIG}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_400(http.post("/v1/chat/completions", headers=ADMIN, json=chat), "model")
    embed = {"model": f"tiny-embed@{TOO_BIG}", "input": "hi"}
    assert_400(http.post("/v1/embeddings", headers=ADMIN, json=embed), "model")
    in_range = http.get("/v1/models/tiny-chat@9223372036854775807", headers=ADMIN)
    assert in_range.status_code == 404


def test_event_cursors_beyond_a_column_are_400(http: TestClient) -> None:
    events = "/v1/fine_tuning/jobs/ftjob-000000000000000000000000/events"
    assert_400(http.get(events, params={"after": f"ftevent-{TOO_BIG}"}, headers=ADMIN), "after")
    assert http.get(events, params={"after": "ftevent-1"}, headers=ADMIN).status_code == 404


def test_the_depth_limit_holds_whatever_the_content_type(http: TestClient) -> None:
    body = "[" * DEEP + "]" * DEEP
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/octet-stream"):
        response = http.post(
            "/v1/fine_tuning/jobs", headers={**ADMIN, "Content-Type": content_type}, content=body.encode()
        )
        assert assert_400(response)["code"] == "json_too_deep"


def test_a_deeply_nested_line_of_an_upload_is_reported_by_line(http: TestClient) -> None:
    chat = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}'
    deep = '{"messages": ' + "[" * DEEP + "]" * DEEP + "}"
    content = f"{chat}\n{deep}\n".encode()
    response = http.post(
        "/v1/files", headers=ADMIN, data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", content)}
    )
    assert response.status_code == 200, response.text
    record = response.json()
    assert record["status"] == "error"
    assert "line 2" in record["status_details"] and "nesting" in record["status_details"]


class _Tokenizer:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def apply_chat_template(self, *args: object, **kwargs: object) -> list[int]:
        raise self.error


def _handle(error: Exception) -> ModelHandle:
    placeholder: Any = object()
    resolved = Resolution(placeholder, placeholder, "m", placeholder, _Tokenizer(error), None)
    return ModelHandle(name="m", info=placeholder, ref=resolved)


def test_chat_template_failures_never_echo_internals() -> None:
    internal = TypeError("can only concatenate str (not 'NoneType') at /srv/models/m/tokenizer_config.json")
    with pytest.raises(InvalidRequestError) as refused:
        encode_chat(_handle(internal), [{"role": "user", "content": "hi"}])
    assert "/srv" not in refused.value.message and "NoneType" not in refused.value.message
    # The template's own raise_exception() speaks to users: its message is kept.
    with pytest.raises(InvalidRequestError) as refused:
        encode_chat(_handle(TemplateError("Conversation roles must alternate")), [{"role": "user", "content": "hi"}])
    assert "roles must alternate" in refused.value.message
