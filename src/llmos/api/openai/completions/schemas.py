"""Legacy text completions: request and response shapes (OpenAI's)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from llmos.api.openai.common import Choice, ResponseObject, SamplingFields, StreamChunk, Usage
from llmos.api.openai.scoring import PromptLogprobsOut
from llmos.api.openai.structured import StructuredFields

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(SamplingFields, StructuredFields):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[str], Field(min_length=1, max_length=64)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=64)]
    )
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    """0 (with ``echo``) scores the prompt without generating."""
    prompt_logprobs: Annotated[int, Field(ge=0)] | None = None
    """vLLM's extra: every prompt token's logprob and this many most likely tokens."""

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(x, int) for x in self.prompt):
            return [[int(x) for x in self.prompt]]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionStreamChoice(Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class CompletionChoice(CompletionStreamChoice):
    prompt_logprobs: PromptLogprobsOut | None = None
    """vLLM's extra, when the request asked for ``prompt_logprobs``."""


class Completion(ResponseObject[CompletionChoice]):
    object: Literal["text_completion"] = "text_completion"
    usage: Usage


class CompletionChunk(StreamChunk[CompletionStreamChoice]):
    """One server-sent event of a streamed completion: OpenAI streams ``Completion`` objects
    whose choices carry the new text and whose usage is null until the last."""

    object: Literal["text_completion"] = "text_completion"
