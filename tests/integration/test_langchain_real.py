"""LangChain's ChatOpenAI against `llmos serve` with SmolLM2: a tool-calling loop through
``bind_tools`` (the call is made, its result goes back, the final answer uses it), a strict tool
under ``tool_choice: auto``, and ``with_structured_output`` by JSON Schema and by function
calling."""

from __future__ import annotations

import json

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import ADMIN_KEY, Server

langchain_openai = pytest.importorskip("langchain_openai")
messages_module = pytest.importorskip("langchain_core.messages")
tools_module = pytest.importorskip("langchain_core.tools")
function_calling = pytest.importorskip("langchain_core.utils.function_calling")

pytestmark = pytest.mark.integration
CHAT_MODEL = "smollm2-135m-instruct"


@tools_module.tool
def get_weather(city: str) -> str:
    """Current weather in a city."""
    return "Sunny and 31 degrees Celsius."


class City(BaseModel):
    """A city and the country it is in."""

    city: str = Field(max_length=40)
    country: str = Field(max_length=40)


def _llm(server: Server, **kwargs: object) -> object:
    return langchain_openai.ChatOpenAI(
        model=CHAT_MODEL,
        base_url=f"{server.url}/v1",
        api_key=ADMIN_KEY,
        temperature=0,
        max_retries=0,
        timeout=600,
        **kwargs,
    )


def test_bind_tools_makes_the_call_and_the_answer_uses_its_result(server: Server) -> None:
    llm = _llm(server)
    question = messages_module.HumanMessage("What is the weather in Paris?")
    first = llm.bind_tools([get_weather], tool_choice="get_weather", strict=True).invoke([question])
    (call,) = first.tool_calls
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str), first
    result = get_weather.invoke(call)  # a ToolMessage answering the call's id
    assert isinstance(result, messages_module.ToolMessage) and result.tool_call_id == call["id"]
    final = llm.bind_tools([get_weather], tool_choice="none").invoke([question, first, result])
    answer = str(final.content)
    assert not final.tool_calls
    assert "31" in answer or "sunny" in answer.lower(), answer


def test_a_strict_tool_under_auto_is_either_a_valid_call_or_an_answer(server: Server) -> None:
    """The model chooses (SmolLM2 answers this one in text); the grammar of text-or-call holds."""
    llm = _llm(server, max_tokens=48).bind_tools([get_weather], strict=True)  # tool_choice left to the model
    parameters = function_calling.convert_to_openai_tool(get_weather, strict=True)["function"]["parameters"]
    reply = llm.invoke([messages_module.HumanMessage("What is the weather in Paris?")])
    for call in reply.tool_calls:
        assert call["name"] == "get_weather"
        jsonschema.validate(call["args"], parameters)
    text = str(reply.content)
    assert reply.tool_calls or (text.strip() and not text.lstrip().startswith("<tool_call>")), reply


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_a_valid_object(server: Server, method: str) -> None:
    structured = _llm(server).with_structured_output(City, method=method, strict=True)
    city = structured.invoke("Name the capital of France and its country.")
    assert isinstance(city, City), city
    jsonschema.validate(json.loads(city.model_dump_json()), City.model_json_schema())
    assert city.city.strip() and city.country.strip()
