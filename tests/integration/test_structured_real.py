"""Structured outputs and a tool-calling loop with SmolLM2 through the official openai client."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import pytest

from tests.integration.conftest import Server

pytestmark = pytest.mark.integration
CHAT_MODEL = "smollm2-135m-instruct"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    },
}


def _schema(i: int) -> dict[str, Any]:
    """A varied schema: nested objects, arrays, enums, bounded numbers and strings, $defs/$ref."""
    rng = random.Random(i)
    kinds: list[dict[str, Any]] = [
        {"type": "string", "maxLength": rng.randint(3, 30)},
        {"type": "integer", "minimum": 0, "maximum": rng.randint(5, 1000)},
        {"type": "boolean"},
        {"enum": ["low", "medium", "high"]},
        {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": rng.randint(1, 4)},
        {"$ref": "#/$defs/place"},
        {"type": "string", "format": "date"},
    ]
    fields = {f"f{j}": rng.choice(kinds) for j in range(rng.randint(1, 5))}
    return {
        "type": "object",
        "properties": fields,
        "required": list(fields),
        "additionalProperties": False,
        "$defs": {
            "place": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            }
        },
    }


def _structured(server: Server, count: int) -> None:
    client = server.client(timeout=600)

    def ask(i: int) -> tuple[dict[str, Any], Any]:
        schema = _schema(i)
        r = client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": f"Describe a trip as JSON (request {i})."}],
            response_format={"type": "json_schema", "json_schema": {"name": "trip", "schema": schema, "strict": True}},
            max_tokens=300,
            temperature=0.7,
            seed=i,
        )
        return schema, r.choices[0]

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(count)))
    for schema, choice in results:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_schema_answers_parse_and_validate(server: Server) -> None:
    _structured(server, 4)


@pytest.mark.slow
def test_two_hundred_json_schema_answers_all_parse_and_validate(server: Server) -> None:
    _structured(server, 200)


def test_a_tool_calling_loop_through_the_openai_client(server: Server) -> None:
    client = server.client(timeout=300)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=CHAT_MODEL, messages=messages, tools=[WEATHER], tool_choice="required", temperature=0
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
    messages.append(choice.message.model_dump(exclude_none=False))  # echoed back as the client has it
    messages.append({"role": "tool", "tool_call_id": call.id, "content": "Sunny and 31 degrees Celsius."})
    final = client.chat.completions.create(
        model=CHAT_MODEL, messages=messages, tools=[WEATHER], tool_choice="none", temperature=0
    )
    answer = final.choices[0].message.content or ""
    assert final.choices[0].finish_reason == "stop"
    assert "31" in answer or "sunny" in answer.lower(), answer
