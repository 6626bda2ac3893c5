"""Function tools in a chat prompt: through the model's chat template when it renders tools,
else through a fallback prompt (docs/api.md, "Tools").

Either way the model is asked to answer a call as ``<tool_call>{"name": ..., "arguments": {...}}
</tool_call>`` (the convention of Hermes- and Qwen-style templates), which the API parses back
into ``tool_calls``; a previous call the client echoes back is rendered the same way, and a
tool's result as a ``tool`` message naming the call it answers.
"""

from __future__ import annotations

import json
from typing import Any

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"

FALLBACK_INSTRUCTIONS = (
    "Functions you may call (JSON Schema):\n{tools}\nTo call, answer only "
    + TOOL_CALL_OPEN
    + '{{"name": ..., "arguments": {{...}}}}'
    + TOOL_CALL_CLOSE
    + " per call. Results come back from the tool."
)


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the chat template reads the ``tools`` it is given (it names them)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def _arguments(call: dict[str, Any]) -> Any:
    text = call["function"]["arguments"]
    try:
        return json.loads(text)
    except ValueError:
        return text


def for_template(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as Hugging Face chat templates take tool calls: arguments as objects."""
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [
                {
                    "type": "function",
                    "id": c["id"],
                    "function": {"name": c["function"]["name"], "arguments": _arguments(c)},
                }
                for c in m["tool_calls"]
            ]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def call_text(name: str, arguments: Any) -> str:
    return TOOL_CALL_OPEN + json.dumps({"name": name, "arguments": arguments}) + TOOL_CALL_CLOSE


def fallback(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plain messages for a template without tool support: the tools described in the system
    message, calls and results written into the messages' content."""
    described = "\n".join(json.dumps(t["function"], separators=(",", ":")) for t in tools)
    instructions = FALLBACK_INSTRUCTIONS.format(tools=described)
    out: list[dict[str, Any]] = []
    for m in messages:
        content = m.get("content") or ""
        if m.get("tool_calls"):
            calls = "\n".join(call_text(c["function"]["name"], _arguments(c)) for c in m["tool_calls"])
            content = f"{content}\n{calls}".strip()
        elif m["role"] == "tool":
            content = f"Result of call {m.get('tool_call_id', '')}: {content}"
        out.append({"role": m["role"], "content": content})
    if not tools:  # a conversation with earlier calls, but none to make now (``tool_choice: none``)
        return out
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{instructions}"}
    else:
        out.insert(0, {"role": "system", "content": instructions})
    return out


def chat_with_tools(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and ``tools`` argument to render a chat with (``tools`` None: none to pass)."""
    if not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        return messages, None
    if template_renders_tools(tokenizer):
        return for_template(messages), tools or None
    return fallback(messages, tools or []), None
