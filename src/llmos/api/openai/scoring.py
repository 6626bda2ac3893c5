"""Prompt logprobs as the API returns them: legacy completions' ``echo`` + ``logprobs`` (OpenAI's
shape, the prompt's tokens first) and vLLM's ``prompt_logprobs`` extra (vLLM's shape), and the
checks both make before any work is queued."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from llmos.config import Settings
from llmos.engine.protocol import ModelInfo, PromptLogprob, TokenLogprob
from llmos.errors import InvalidRequestError


class PromptTokenLogprob(BaseModel):
    """One token of vLLM's ``prompt_logprobs`` entries."""

    logprob: float
    rank: int | None
    """1 for the most likely token of the vocabulary (vLLM's ``rank``)."""
    decoded_token: str


PromptLogprobsOut = list[dict[str, PromptTokenLogprob] | None]
"""vLLM's shape: per prompt token, null for the first, else by token id (as a string) the token
itself, then the ``prompt_logprobs`` most likely ones."""


def check_prompt_scoring(k: int | None, *, param: str, info: ModelInfo, model: str, settings: Settings) -> None:
    """Refuse, naming ``param``, a prompt scoring the model's backend cannot do or ``k`` over the maximum."""
    if k is None:
        return
    if k > settings.max_top_logprobs:
        raise InvalidRequestError(f"{param} must be at most {settings.max_top_logprobs}", param=param)
    if info.task not in ("chat", "completion") or not info.scores_prompts:
        raise InvalidRequestError(
            f"model {model} cannot score prompts (its backend returns no prompt logprobs; see docs/api.md)",
            param=param,
        )


def vllm_prompt_logprobs(scored: Sequence[PromptLogprob], k: int) -> PromptLogprobsOut:
    out: PromptLogprobsOut = []
    for token in scored:
        if token.logprob is None:
            out.append(None)
            continue
        entry = {
            str(token.token_id): PromptTokenLogprob(logprob=token.logprob, rank=token.rank, decoded_token=token.token)
        }
        for rank, (token_id, text, logprob) in enumerate(token.top[:k], start=1):
            entry.setdefault(str(token_id), PromptTokenLogprob(logprob=logprob, rank=rank, decoded_token=text))
        out.append(entry)
    return out


def legacy_entries(
    prompt: Sequence[PromptLogprob], generated: Sequence[TokenLogprob], k: int, generated_offset: int
) -> tuple[list[str], list[float | None], list[dict[str, float] | None], list[int]]:
    """OpenAI's legacy ``logprobs`` lists (tokens, token_logprobs, top_logprobs, text_offset) of
    the echoed prompt's tokens and then the generated ones, whose offsets start at
    ``generated_offset`` (the echoed text's length); every ``top_logprobs`` entry holds the ``k``
    most likely tokens and the token itself (the first prompt token's is null)."""
    tokens: list[str] = []
    logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = 0
    for p in prompt:
        tokens.append(p.token)
        logprobs.append(p.logprob)
        tops.append(None if p.logprob is None else {text: v for _, text, v in p.top[:k]} | {p.token: p.logprob})
        offsets.append(offset)
        offset += len(p.token)
    offset = generated_offset
    for t in generated:
        tokens.append(t.token)
        logprobs.append(t.logprob)
        tops.append({x.token: x.logprob for x in t.top_logprobs[:k]} | {t.token: t.logprob})
        offsets.append(offset)
        offset += len(t.token)
    return tokens, logprobs, tops, offsets
