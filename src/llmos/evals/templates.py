"""Templates of the Evals API: ``{{item.question}}``, ``{{item.answers.0}}``, ``{{sample.output_text}}``.

A fixed grammar (a namespace, then names or list indices joined by dots) replaced by a regular
expression, as the alert templates are (``monitoring/alerts/template.py``, whose grammar is
Prometheus's ``$labels``): no template engine, nothing evaluated, so an eval's text cannot run code.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from llmos.errors import InvalidRequestError

NAMESPACES = ("item", "sample")
_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_REFERENCE = re.compile(r"^\s*(item|sample)((?:\.[A-Za-z0-9_\-]+)*)\s*$")
MISSING = object()
"""What ``lookup`` returns for a path the namespaces do not hold."""


def references(text: str, *, param: str, allowed: tuple[str, ...] = NAMESPACES) -> list[tuple[str, ...]]:
    """The paths ``text`` refers to, e.g. ``[("item", "question")]``; a placeholder that is not
    ``namespace.path`` with a namespace in ``allowed`` is a 400 naming ``param``."""
    found = []
    for match in _PLACEHOLDER.finditer(text):
        reference = _REFERENCE.match(match[1])
        if reference is None or reference[1] not in allowed:
            names = " or ".join(f"{{{{{n}.name}}}}" for n in allowed)
            raise InvalidRequestError(f"unsupported template {match[0][:80]!r}: use {names}", param=param)
        found.append((reference[1], *filter(None, reference[2].split("."))))
    return found


def lookup(path: tuple[str, ...], namespaces: Mapping[str, Any]) -> Any:
    """The value at ``path`` (a list index is a number), or ``MISSING``."""
    value: Any = namespaces
    for part in path:
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return MISSING
    return value


def as_text(value: Any) -> str:
    """A value as it appears in a rendered template: strings as they are, the rest as JSON."""
    if value is MISSING or value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def render(text: str, namespaces: Mapping[str, Any]) -> str:
    """``text`` with each placeholder replaced by its value; a path the item lacks renders empty
    (an optional field of the item's schema). Templates were checked when the eval was created."""

    def fill(match: re.Match[str]) -> str:
        reference = _REFERENCE.match(match[1])
        if reference is None:
            return match[0]
        return as_text(lookup((reference[1], *filter(None, reference[2].split("."))), namespaces))

    return _PLACEHOLDER.sub(fill, text)


def is_template(text: str) -> bool:
    return _PLACEHOLDER.search(text) is not None
