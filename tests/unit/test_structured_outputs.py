"""Structured outputs and tool calls on the tiny random chat model: whatever its random weights
prefer, the grammar decides what may come out, so every answer parses and validates."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient

from llmos.api.openai import structured
from llmos.engine import GenerationRequest, SamplingParams
from llmos.engine.local import LocalEngine
from llmos.engine.protocol import GrammarSpec
from llmos.errors import InvalidRequestError
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.tiny_models import build_tiny_chat_model

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
    {
        "type": "object",
        "properties": {
            "point": {"$ref": "#/$defs/point"},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        },
        "required": ["point", "ok", "tags"],
        "additionalProperties": False,
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"enum": [1, 2]}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
    },
    {"type": "string", "format": "date"},
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 3},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture
def tools_model(loaded_platform: Platform, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny chat model with room for the fallback tool prompt (its tokenizer spends a token on
    almost every character)."""
    root = build_tiny_chat_model(tmp_path_factory.mktemp("tiny-tools"), context=1024)
    loaded_platform.registry.pull(f"file:{root}", name="tiny-tools")
    return "tiny-tools"


def _ask(client: openai.OpenAI, model: str = "tiny-chat", **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 120)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}], **kwargs)


@pytest.mark.parametrize("schema", SCHEMAS)
def test_every_json_schema_answer_parses_and_validates(client: openai.OpenAI, schema: dict[str, Any]) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    r = _ask(client, response_format=fmt, n=3, seed=7, temperature=1.0)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), schema)


def test_json_object_answers_are_json_objects_and_text_stays_free(client: openai.OpenAI) -> None:
    r = _ask(client, response_format={"type": "json_object"}, n=2, seed=3, max_tokens=200)
    stopped = [c for c in r.choices if c.finish_reason == "stop"]
    assert stopped
    for choice in stopped:
        assert isinstance(json.loads(choice.message.content or ""), dict)
    free = _ask(client, response_format={"type": "text"}, temperature=0, max_tokens=8)
    assert free.choices[0].message.content == _ask(client, temperature=0, max_tokens=8).choices[0].message.content


def test_regex_and_choice_extras(client: openai.OpenAI) -> None:
    r = _ask(client, extra_body={"structured_outputs": {"regex": "[a-c]{2}-[0-9]{3}"}}, seed=1)
    assert r.choices[0].message.content is not None
    import re

    assert re.fullmatch("[a-c]{2}-[0-9]{3}", r.choices[0].message.content)
    r = _ask(client, extra_body={"guided_choice": ["yes", "no", "maybe"]}, n=3, seed=2)
    assert {c.message.content for c in r.choices} <= {"yes", "no", "maybe"}
    text = client.completions.create(
        model="tiny-chat", prompt="Pick:", max_tokens=20, extra_body={"guided_choice": ["alpha", "beta"]}
    )
    assert text.choices[0].text in ("alpha", "beta")


def test_constrained_and_free_rows_share_one_decode_step(loaded_platform: Platform) -> None:
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)

    async def run(rid: str, grammar: Any) -> str:
        handle = await engine.resolve("tiny-chat")
        prompt = await engine.encode_text(handle, "Hello")
        params = SamplingParams(max_tokens=40, temperature=0.0)
        text = ""
        async for d in engine.generate(
            GenerationRequest(rid, "tiny-chat", prompt, params, handle=handle, grammar=grammar)
        ):
            text += d.text
        return text

    async def main() -> None:
        handle = await engine.resolve("tiny-chat")
        schema = SCHEMAS[0]
        grammar = await engine.compile_grammar(handle, GrammarSpec("json_schema", json.dumps(schema)), param="x")
        assert (
            await engine.compile_grammar(handle, GrammarSpec("json_schema", json.dumps(schema)), param="x") is grammar
        )
        solo_free = await run("solo", None)
        key = engine.registry.get("tiny-chat").id
        runner = engine.residency.acquire(key)
        free, constrained = await asyncio.gather(run("free", None), run("json", grammar))
        engine.residency.release(key)
        assert runner.peak_rows == 2  # one batch: the mask applies to its own row only
        assert free == solo_free
        jsonschema.validate(json.loads(constrained), schema)
        await engine.shutdown()

    asyncio.run(main())


def test_a_forced_tool_call_has_valid_arguments_whole_and_streamed(client: openai.OpenAI, tools_model: str) -> None:
    r = _ask(client, tools_model, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, seed=5)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    named = {"type": "function", "function": {"name": "get_weather"}}
    with client.chat.completions.stream(
        model=tools_model,
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=120,
        tools=[WEATHER],
        tool_choice=named,
        seed=5,
    ) as stream:
        final = stream.get_final_completion()
    streamed = final.choices[0]
    assert streamed.finish_reason == "tool_calls"
    (call,) = streamed.message.tool_calls or []
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_a_tool_result_goes_back_and_the_model_answers(client: openai.OpenAI, tools_model: str) -> None:
    r = _ask(client, tools_model, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, seed=5)
    call = (r.choices[0].message.tool_calls or [])[0]
    history: list[Any] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()], "refusal": None, "audio": None},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    answer = client.chat.completions.create(model=tools_model, messages=history, tools=[WEATHER], max_tokens=8)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")


def _error(http: TestClient, body: dict[str, Any], path: str = "/v1/chat/completions") -> dict[str, Any]:
    r = http.post(path, headers=AUTH, json={"model": "tiny-chat", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error: dict[str, Any] = r.json()["error"]
    return error


MESSAGES = [{"role": "user", "content": "Hi"}]


def test_bad_structured_outputs_and_tools_are_refused_naming_the_field(http: TestClient) -> None:
    def fmt(schema: Any) -> dict[str, Any]:
        return {
            "messages": MESSAGES,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        }

    schema_param = "response_format.json_schema.schema"
    assert _error(http, fmt({"type": "objectx"}))["param"] == schema_param
    unsupported = _error(http, fmt({"type": "object", "if": {}, "then": {}}))
    assert unsupported["param"] == schema_param and '"if"' in unsupported["message"]
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(24):
        deep = {"type": "array", "items": deep}
    assert _error(http, fmt(deep))["param"] == schema_param
    assert _error(http, fmt({"enum": list(range(5000))}))["param"] == schema_param
    assert _error(http, {"messages": MESSAGES, "guided_regex": "(unclosed"})["param"] == "guided_regex"
    both = {"messages": MESSAGES, "response_format": {"type": "json_object"}, "guided_choice": ["a"]}
    assert _error(http, both)["param"] == "guided_choice"
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    assert _error(http, {"messages": MESSAGES, "tools": [tool, tool]})["param"] == "tools[1].function.name"
    bad_name = {"type": "function", "function": {"name": "not an identifier"}}
    assert _error(http, {"messages": MESSAGES, "tools": [bad_name]})["param"].startswith("tools")
    other = {"type": "function", "function": {"name": "g"}}
    assert _error(http, {"messages": MESSAGES, "tools": [tool], "tool_choice": other})["param"] == "tool_choice"
    stray = [*MESSAGES, {"role": "tool", "tool_call_id": "call_nobody", "content": "x"}]
    assert _error(http, {"messages": stray, "tools": [tool]})["param"] == "messages[1].tool_call_id"
    assert http.get("/health").status_code == 200


def test_a_grammar_over_the_compile_budget_is_refused(loaded_platform: Platform) -> None:
    settings = loaded_platform.settings.model_copy(update={"grammar_compile_budget": 1000})
    from dataclasses import replace

    from llmos.api import create_app

    with TestClient(create_app(platform=replace(loaded_platform, settings=settings))) as http:
        schema = {
            "type": "object",
            "properties": {f"f{i}": {"type": "string", "pattern": "[a-z]{3,40}"} for i in range(30)},
        }
        body = {
            "messages": MESSAGES,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        }
        error = _error(http, body)
        assert error["param"] == "response_format.json_schema.schema"
        assert (
            http.post(
                "/v1/chat/completions", headers=AUTH, json={"model": "tiny-chat", "max_tokens": 2, "messages": MESSAGES}
            ).status_code
            == 200
        )


def test_a_schema_is_checked_once_by_its_canonical_text_and_refused_every_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked: list[Any] = []
    real = structured.validators.validator_for

    def counting(schema: Any, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:  # the platform's call (jsonschema's own pass a default)
            checked.append(schema)
        return real(schema, *args, **kwargs)

    monkeypatch.setattr(structured.validators, "validator_for", counting)
    structured._check_schema.cache_clear()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    reordered = {"properties": {"b": {"type": "string"}, "a": {"type": "integer"}}, "type": "object"}
    first = structured.schema_grammar(schema, param="response_format.json_schema.schema")
    again = structured.schema_grammar(reordered, param="guided_json")
    assert first == again and len(checked) == 1
    for param in ("guided_json", "structured_outputs.json"):
        with pytest.raises(InvalidRequestError) as refused:
            structured.schema_grammar({"type": "objectx"}, param=param)
        assert refused.value.param == param
    assert len(checked) == 3
