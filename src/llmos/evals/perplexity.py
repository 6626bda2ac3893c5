"""Perplexity of a causal model on a run's texts, scored through the completions endpoint's own
prompt scoring (``echo`` with ``max_tokens: 0``: a logprob for every prompt token, ADR 0013), so
the number is what the served model assigns, batched and prefix-cached as any scoring request is.

Perplexity is over the corpus: exp of minus the mean logprob of every scored token (each text's
first token has no logprob: nothing precedes it), so long texts weigh by their tokens, as
lm-evaluation-harness's token perplexity does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

PROMPTS_PER_REQUEST = 16
"""Texts sent in one completions request (the endpoint takes at most 64)."""


class Scorer(Protocol):
    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """A text_completion object for a completions request body."""
        ...


def scoring_request(model: str, texts: Sequence[str]) -> dict[str, Any]:
    return {"model": model, "prompt": list(texts), "echo": True, "logprobs": 0, "max_tokens": 0, "temperature": 0}


async def perplexity(scorer: Scorer, model: str, texts: Sequence[str]) -> dict[str, Any]:
    """The corpus perplexity of ``model`` on ``texts`` (non-empty strings), its mean token logprob
    and the tokens scored; ``perplexity`` is None when no token was scored."""
    total, tokens = 0.0, 0
    for start in range(0, len(texts), PROMPTS_PER_REQUEST):
        chunk = texts[start : start + PROMPTS_PER_REQUEST]
        completion = await scorer.complete(scoring_request(model, chunk))
        for choice in completion["choices"]:
            scored = [lp for lp in choice["logprobs"]["token_logprobs"] if lp is not None]
            total += sum(scored)
            tokens += len(scored)
    mean = total / tokens if tokens else None
    return {
        "task": "perplexity",
        "model": model,
        "items": len(texts),
        "tokens": tokens,
        "mean_logprob": mean,
        "perplexity": math.exp(-mean) if mean is not None else None,
    }
