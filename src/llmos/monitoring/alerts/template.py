"""Labels and annotations templated as Prometheus writes them: ``{{ $value }}`` and
``{{ $labels.model_name }}``, nothing else. A fixed grammar replaced by a regular expression:
no template engine, nothing evaluated, so a rule's text cannot run code."""

from __future__ import annotations

import re
from collections.abc import Mapping

_PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_EXPRESSION = re.compile(r"^\s*\$(?:(value)|labels\.([a-zA-Z_][a-zA-Z0-9_]*))\s*$")


def check_template(text: str) -> None:
    """Raises ValueError naming the first placeholder that is neither ``$value`` nor ``$labels.x``."""
    for match in _PLACEHOLDER.finditer(text):
        if not _EXPRESSION.match(match[1]):
            raise ValueError(f"unsupported template {match[0]!r}: use {{{{ $value }}}} or {{{{ $labels.name }}}}")


def render(text: str, value: float | None, labels: Mapping[str, str]) -> str:
    """The text with its placeholders filled; a label the alert lacks renders empty, as in Prometheus."""

    def fill(match: re.Match[str]) -> str:
        expression = _EXPRESSION.match(match[1])
        if expression is None:
            return match[0]  # checked when the rule was accepted; left as written
        if expression[1]:
            return "" if value is None else f"{value:.4g}"
        return labels.get(expression[2], "")

    return _PLACEHOLDER.sub(fill, text)
