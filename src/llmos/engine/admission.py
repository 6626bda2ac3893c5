"""The refusal both backends give a request that could never fit their key/value cache."""

from __future__ import annotations

from llmos.errors import InvalidRequestError


def cache_exceeded(n: int, reserve: int, budget_tokens: int, model: str, setting: str) -> InvalidRequestError:
    """400 ``kv_cache_exceeded``: ``n`` choices of ``reserve`` tokens each cannot fit
    ``budget_tokens`` even alone (``setting`` names what sets the budget)."""
    return InvalidRequestError(
        f"this request needs room for {n} x {reserve} tokens in the key/value cache, more than the "
        f"{budget_tokens} tokens {model} has ({setting}); reduce max_tokens, n or the prompt",
        param="max_tokens",
        code="kv_cache_exceeded",
    )
