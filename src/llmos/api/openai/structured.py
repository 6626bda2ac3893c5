"""Structured outputs: ``response_format`` (OpenAI's), and regex and choice constraints (vLLM's
``structured_outputs`` and ``guided_*`` extras), checked and turned into one ``GrammarSpec``.

Everything a client can get wrong is refused here with a 400 naming the field, before any work
is queued: a schema that is not valid JSON Schema, one nested too deep or with too many enum
values, keywords the grammar library does not implement (it names them), a bad regex.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Annotated, Any, Literal

from jsonschema import exceptions as schema_errors
from jsonschema import validators
from pydantic import Field

from llmos.api.openai.common import OpenAIRequest
from llmos.engine.protocol import GrammarSpec
from llmos.errors import InvalidRequestError

MAX_SCHEMA_DEPTH = 20
"""Nesting of objects and arrays in a schema (a recursive ``$ref`` is one level, however deep
the output it allows)."""
MAX_ENUM_VALUES = 1000
"""Enum and choice values in one schema, all together (OpenAI's limit)."""
NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class JsonSchemaFormat(OpenAIRequest):
    name: Annotated[str, Field(pattern=NAME)]
    description: str | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None
    strict: bool | None = None


class ResponseFormat(OpenAIRequest):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(OpenAIRequest):
    """vLLM's ``structured_outputs``: exactly one of these."""

    json_: Annotated[dict[str, Any] | None, Field(alias="json")] = None
    regex: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None


class StructuredFields(OpenAIRequest):
    """The request fields that constrain the output, shared by chat and completions."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | None = None
    guided_regex: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    guided_choice: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = None


def _depth(node: Any) -> int:
    if isinstance(node, dict):
        return 1 + max((_depth(v) for v in node.values()), default=0)
    if isinstance(node, list):
        return 1 + max((_depth(v) for v in node), default=0)
    return 0


def _enum_values(node: Any) -> int:
    if isinstance(node, dict):
        own = len(node["enum"]) if isinstance(node.get("enum"), list) else 0
        return own + sum(_enum_values(v) for v in node.values())
    if isinstance(node, list):
        return sum(_enum_values(v) for v in node)
    return 0


class _SchemaRefused(ValueError):
    """Why a schema is refused, without the request field (that is added by the caller)."""


def schema_grammar(schema: dict[str, Any], *, param: str) -> GrammarSpec:
    """A JSON Schema checked (valid, bounded) and made a grammar; the library's own refusals
    (unimplemented keywords, unknown formats) come from compiling it."""
    text = json.dumps(schema, sort_keys=True)
    check = _check_schema if len(text) <= MAX_CACHED_SCHEMA_CHARS else _check_schema.__wrapped__
    try:
        check(text)
    except _SchemaRefused as exc:
        raise InvalidRequestError(str(exc), param=param) from exc
    return GrammarSpec("json_schema", text)


MAX_CACHED_SCHEMA_CHARS = 65_536
"""Schemas longer than this are checked every time: the cache's memory stays bounded whatever
clients send."""


@functools.lru_cache(maxsize=256)
def _check_schema(text: str) -> None:
    """Checks a schema by its canonical text once: the grammar compiled from it is cached by the
    same text, and a large schema's meta-schema validation would otherwise run on the event loop
    for every request that repeats it. A refusal is not cached (it raises)."""
    schema = json.loads(text)
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise _SchemaRefused(f"the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
    if _enum_values(schema) > MAX_ENUM_VALUES:
        raise _SchemaRefused(f"the schema has more than {MAX_ENUM_VALUES} enum values in all")
    try:
        validators.validator_for(schema).check_schema(schema)
    except schema_errors.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise _SchemaRefused(f"invalid JSON Schema at '{where}': {exc.message}") from exc


def regex_grammar(pattern: str, *, param: str) -> GrammarSpec:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise InvalidRequestError(f"invalid regular expression: {exc}", param=param) from exc
    return GrammarSpec("regex", pattern)


def choice_grammar(choices: list[str], *, param: str) -> GrammarSpec:
    if len(choices) > MAX_ENUM_VALUES:
        raise InvalidRequestError(f"at most {MAX_ENUM_VALUES} choices are allowed", param=param)
    return GrammarSpec("regex", "|".join(f"(?:{re.escape(c)})" for c in choices))


def requested_grammar(req: StructuredFields) -> tuple[GrammarSpec, str] | None:
    """The grammar a request asks for and the field that asked (None: free text); asking in
    more than one field is refused."""
    asked: list[tuple[GrammarSpec, str]] = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        asked.append((GrammarSpec("json_schema", '{"type": "object"}'), "response_format"))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise InvalidRequestError("a json_schema response format needs 'json_schema'", param="response_format")
        schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
        param = "response_format.json_schema.schema"
        asked.append((schema_grammar(schema, param=param), param))
    extras = req.structured_outputs
    if extras is not None:
        given = [
            (name, value)
            for name, value in (("json", extras.json_), ("regex", extras.regex), ("choice", extras.choice))
            if value is not None
        ]
        if len(given) != 1:
            raise InvalidRequestError(
                "structured_outputs takes exactly one of json, regex, choice", param="structured_outputs"
            )
        asked.append(_extra(given[0][0], given[0][1], f"structured_outputs.{given[0][0]}"))
    for name, value in (("json", req.guided_json), ("regex", req.guided_regex), ("choice", req.guided_choice)):
        if value is not None:
            asked.append(_extra(name, value, f"guided_{name}"))
    if len(asked) > 1:
        raise InvalidRequestError(
            f"only one output constraint is allowed; this request has {', '.join(p for _, p in asked)}",
            param=asked[1][1],
        )
    return asked[0] if asked else None


def _extra(kind: str, value: Any, param: str) -> tuple[GrammarSpec, str]:
    if kind == "json":
        return schema_grammar(value, param=param), param
    if kind == "regex":
        return regex_grammar(value, param=param), param
    return choice_grammar(value, param=param), param
