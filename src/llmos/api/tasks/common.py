"""What the task endpoints (classifications, NER) share: their `input` field and its limits."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from llmos.config import Settings
from llmos.errors import InvalidRequestError

ModelField = Annotated[str, Field(min_length=1, max_length=512)]
TextInput = str | Annotated[list[str], Field(min_length=1)]
"""One text or a non-empty list of texts."""


def text_inputs(value: str | list[str], settings: Settings) -> list[str]:
    """The texts of a request, as many as ``max_embedding_inputs``, none blank."""
    texts = [value] if isinstance(value, str) else value
    if len(texts) > settings.max_embedding_inputs:
        raise InvalidRequestError(f"at most {settings.max_embedding_inputs} inputs per request", param="input")
    if any(not t.strip() for t in texts):
        raise InvalidRequestError("inputs must not be empty", param="input")
    return texts


def listing(model: str, data: list[dict[str, Any]], prompt_tokens: int) -> dict[str, Any]:
    return {
        "object": "list",
        "model": model,
        "data": data,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
