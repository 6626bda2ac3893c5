"""Attributes of vector store files and OpenAI's filters on them (comparison and compound)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from llmos.errors import InvalidRequestError

Attributes = dict[str, str | float | bool]
MAX_ATTRIBUTES = 16
MAX_DEPTH = 8
_COMPARISONS = frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"})
_ORDERED = frozenset({"gt", "gte", "lt", "lte"})


def check_attributes(value: Any, param: str = "attributes") -> Attributes | None:
    """OpenAI's limits: 16 keys of at most 64 characters; strings of at most 512, numbers, booleans."""
    if value is None:
        return None
    if not isinstance(value, dict) or len(value) > MAX_ATTRIBUTES:
        raise InvalidRequestError(f"{param} must be an object of at most {MAX_ATTRIBUTES} keys", param=param)
    for key, item in value.items():
        if not isinstance(key, str) or not 0 < len(key) <= 64:
            raise InvalidRequestError(f"{param} keys must be 1 to 64 characters", param=param)
        if isinstance(item, str):
            if len(item) > 512:
                raise InvalidRequestError(f"{param}.{key}: strings must be at most 512 characters", param=param)
        elif not isinstance(item, int | float | bool):
            raise InvalidRequestError(f"{param}.{key} must be a string, a number or a boolean", param=param)
    return dict(value)


def check_filter(value: Any, known_keys: Collection[str], depth: int = 0) -> dict[str, Any]:
    """``value`` if it is a well-formed filter over ``known_keys``; else 400 naming ``filters``."""
    if depth > MAX_DEPTH:
        raise InvalidRequestError(f"filters may nest at most {MAX_DEPTH} deep", param="filters")
    if not isinstance(value, dict):
        raise InvalidRequestError("a filter must be an object", param="filters")
    kind = value.get("type")
    if kind in ("and", "or"):
        parts = value.get("filters")
        if not isinstance(parts, list) or not parts:
            raise InvalidRequestError(f"an '{kind}' filter needs a non-empty 'filters' list", param="filters")
        for part in parts:
            check_filter(part, known_keys, depth + 1)
        return value
    if kind not in _COMPARISONS:
        raise InvalidRequestError(
            f"filter type must be one of and, or, {', '.join(sorted(_COMPARISONS))}", param="filters"
        )
    key, operand = value.get("key"), value.get("value")
    if not isinstance(key, str) or key not in known_keys:
        raise InvalidRequestError(
            f"filter key {str(key)[:64]!r} is not an attribute of this store's files", param="filters"
        )
    if kind in ("in", "nin"):
        if not isinstance(operand, list) or not all(_scalar(v) for v in operand):
            raise InvalidRequestError(f"an '{kind}' filter needs a list of strings or numbers", param="filters")
    elif kind in _ORDERED:
        if not _number(operand):
            raise InvalidRequestError(f"a '{kind}' filter needs a number", param="filters")
    elif not _scalar(operand):
        raise InvalidRequestError(f"an '{kind}' filter needs a string, number or boolean", param="filters")
    return value


def matches(flt: Mapping[str, Any], attributes: Mapping[str, Any]) -> bool:
    """Whether a file with ``attributes`` passes the checked filter ``flt`` (a missing attribute
    fails every comparison but ``ne`` and ``nin``)."""
    kind = flt["type"]
    if kind == "and":
        return all(matches(f, attributes) for f in flt["filters"])
    if kind == "or":
        return any(matches(f, attributes) for f in flt["filters"])
    operand = flt["value"]
    present = flt["key"] in attributes
    actual = attributes.get(flt["key"])
    if kind == "eq":
        return present and _same(actual, operand)
    if kind == "ne":
        return not (present and _same(actual, operand))
    if kind == "in":
        return present and any(_same(actual, v) for v in operand)
    if kind == "nin":
        return not (present and any(_same(actual, v) for v in operand))
    if not _number(actual):
        return False
    left, right = float(actual), float(operand)  # type: ignore[arg-type]
    return {"gt": left > right, "gte": left >= right, "lt": left < right, "lte": left <= right}[kind]


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalar(value: object) -> bool:
    return isinstance(value, str | int | float | bool)


def _same(a: object, b: object) -> bool:
    """Equality that keeps booleans apart from the numbers 0 and 1."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b
