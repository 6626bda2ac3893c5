"""Function tools: the request's ``tools`` and ``tool_choice`` checked, the grammar that forces a
call, and the model's answer parsed back into ``tool_calls`` whose arguments validate against
the function's parameters.

The model answers a call as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(``engine.tool_prompt`` asks it to). When ``tool_choice`` forces a call (``required`` or a named
function) the output is constrained to exactly that, so it always parses and validates; under
``auto`` with a ``strict`` tool or a response format, the model may answer or call, and a call,
once begun, is constrained the same way. Otherwise an answer whose calls do not validate is
returned as text, never as a broken call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from jsonschema import validators
from pydantic import Field

from llmos.api.openai.common import OpenAIRequest
from llmos.api.openai.structured import NAME, schema_grammar
from llmos.engine.grammar import JSON_OPTIONS
from llmos.engine.protocol import GrammarSpec
from llmos.engine.tool_prompt import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from llmos.errors import InvalidRequestError

MAX_TOOLS = 128
_CALL = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


class FunctionDefinition(OpenAIRequest):
    name: Annotated[str, Field(pattern=NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(OpenAIRequest):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(OpenAIRequest):
    name: str


class NamedToolChoice(OpenAIRequest):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class CalledFunction(OpenAIRequest):
    name: str
    arguments: str


class ToolCallIn(OpenAIRequest):
    """A call the client echoes back in an assistant message."""

    id: Annotated[str, Field(min_length=1, max_length=256)]
    type: Literal["function"]
    function: CalledFunction


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str
    """JSON text of an object that validates against the function's parameters."""


def parameters_of(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters if tool.function.parameters is not None else {"type": "object", "properties": {}}


def check_tools(tools: list[Tool] | None, choice: ToolChoice | None) -> None:
    """Names unique, parameters valid JSON Schema, a named choice among the tools."""
    tools = tools or []
    if len(tools) > MAX_TOOLS:
        raise InvalidRequestError(f"at most {MAX_TOOLS} tools are allowed", param="tools")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if tool.function.name in seen:
            raise InvalidRequestError(
                f"tool name '{tool.function.name}' is used twice", param=f"tools[{i}].function.name"
            )
        seen.add(tool.function.name)
        schema_grammar(parameters_of(tool), param=f"tools[{i}].function.parameters")
    if choice is not None and choice != "none" and not tools:
        raise InvalidRequestError("tool_choice needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in seen:
        raise InvalidRequestError(
            f"tool_choice names '{choice.function.name}', which is not in tools", param="tool_choice"
        )


def check_tool_messages(messages: list[Any]) -> None:
    """Every ``tool`` message answers a call an earlier assistant message made."""
    called: set[str] = set()
    for i, m in enumerate(messages):
        for call in m.tool_calls or []:
            called.add(call.id)
        if m.role == "tool":
            if m.tool_call_id is None:
                raise InvalidRequestError("a tool message needs 'tool_call_id'", param=f"messages[{i}].tool_call_id")
            if m.tool_call_id not in called:
                raise InvalidRequestError(
                    f"tool_call_id '{m.tool_call_id}' answers no earlier tool call", param=f"messages[{i}].tool_call_id"
                )


_OPEN = re.escape(TOOL_CALL_OPEN)
_CLOSE = re.escape(TOOL_CALL_CLOSE).replace("/", r"\/")  # a Lark regex ends at an unescaped '/'
# Up to four blanks before the first call and a newline inside its tags: what Hermes-style models
# write, bounded so that a constrained row cannot spend its tokens on blanks. A further call
# follows the last one's closing tag directly: were blanks allowed between calls, a small model
# given the choice writes "\n\n" and the same call again until max_tokens instead of ending.
_CALL_RULES = "".join(
    line + "\n"
    for line in (
        "call: CALL_OPEN body CALL_CLOSE",
        "next_call: NEXT_OPEN body CALL_CLOSE",
        rf"CALL_OPEN: /[ \t\r\n]{{0,4}}{_OPEN}\n?/",
        rf"NEXT_OPEN: /{_OPEN}\n?/",
        rf"CALL_CLOSE: /\n?{_CLOSE}/",
    )
)
# Any text but one that opens a call: a call, once begun, follows the call rule.
_FREE_TEXT = rf"TEXT: /(?s:.*)/ & ~/[ \t\r\n]*{_OPEN}(?s:.*)/" + "\n"


def tools_grammar(
    tools: list[Tool], choice: ToolChoice, parallel: bool, answer: GrammarSpec | None
) -> GrammarSpec | None:
    """The grammar of the answer, or None when nothing constrains it.

    When ``choice`` forces a call (``required`` or a named function): one call (or, with
    ``parallel``, one or more) of the named or any tool. Under ``auto``, when a tool is
    ``strict`` or the answer itself is constrained (``answer``: the response format's grammar):
    either an answer (``answer``'s, or any text that does not open a call) or calls. Either way a
    call's arguments follow its function's parameters, so a call, once begun, always validates.
    """
    if choice == "none" or not tools:
        return None
    forced = choice != "auto"
    if not forced and answer is None and not any(t.function.strict for t in tools):
        return None  # free text; calls are validated after generation (parse_tool_calls)
    chosen = [t for t in tools if not isinstance(choice, NamedToolChoice) or t.function.name == choice.function.name]
    bodies = [
        {
            "type": "object",
            "properties": {"name": {"const": t.function.name}, "arguments": parameters_of(t)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in chosen
    ]
    body: dict[str, Any] = dict(bodies[0]) if len(bodies) == 1 else {"anyOf": bodies}
    body["x-guidance"] = JSON_OPTIONS  # compact, as for response formats
    calls = "call next_call*" if parallel and not isinstance(choice, NamedToolChoice) else "call"
    if forced:
        start, rest = calls, ""
    elif answer is None:
        start, rest = f"TEXT | {calls}", _FREE_TEXT
    else:
        start, rest = f"@answer | {calls}", ""
    lark = f"start: {start}\n{_CALL_RULES}{rest}body: %json {json.dumps(body, sort_keys=True)}\n"
    parts = (("answer", answer),) if answer is not None and not forced else ()
    return GrammarSpec("lark", lark, parts)


def parse_tool_calls(text: str, tools: list[Tool]) -> list[ToolCall] | None:
    """The calls in a model's answer, or None when it is not wholly calls to known tools with
    valid arguments (then it is an ordinary answer)."""
    found = _CALL.findall(text)
    if not found or _CALL.sub("", text).strip():
        return None
    by_name = {t.function.name: t for t in tools}
    calls = []
    for body in found:
        try:
            parsed = json.loads(body)
        except ValueError:
            return None
        if not isinstance(parsed, dict) or parsed.get("name") not in by_name:
            return None
        arguments = parsed.get("arguments", {})
        schema = parameters_of(by_name[parsed["name"]])
        if not validators.validator_for(schema)(schema).is_valid(arguments):
            return None
        calls.append(ToolCall(f"call_{uuid.uuid4().hex[:24]}", parsed["name"], json.dumps(arguments)))
    return calls


def may_be_call(text: str) -> bool:
    """Whether streamed ``text`` may still turn out to be a tool call (so it is held back)."""
    head = text.lstrip()
    return head.startswith(TOOL_CALL_OPEN) or TOOL_CALL_OPEN.startswith(head)


def tools_in_play(tools: list[Tool] | None, choice: ToolChoice | None) -> list[Tool]:
    """The tools the model may call in this request (none when ``tool_choice`` is ``none``)."""
    return [] if not tools or choice == "none" else tools


class HeldCalls:
    """A streamed choice whose text may be a tool call is held back until it is clear: text that
    cannot begin a call is passed on at once; a call is sent whole when the choice ends."""

    def __init__(self, tools: list[Tool]) -> None:
        self.tools = tools
        self.held = ""
        self.passing = False

    def push(self, text: str) -> str:
        """The text to stream now."""
        if self.passing:
            return text
        self.held += text
        if may_be_call(self.held):
            return ""
        self.passing, out, self.held = True, self.held, ""
        return out

    def finish(self) -> tuple[str, list[ToolCall] | None]:
        """At the choice's end: text still held, or the calls it made."""
        calls = parse_tool_calls(self.held, self.tools) if self.held else None
        return ("", calls) if calls else (self.held, None)
