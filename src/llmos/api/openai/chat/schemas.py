"""Chat completions: request and response shapes (OpenAI's)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from llmos.api.openai.common import Choice, ResponseObject, SamplingFields, StreamChunk, StrictModel, Usage


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    store: bool | None = False
    """Keep the request and its answer as a stored completion of the caller's tenant."""
    metadata: dict[str, Any] | None = None
    """Up to 16 string pairs kept with a stored completion (checked with the job metadata's rules)."""


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(Choice):
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(ResponseObject[ChatChoice]):
    object: Literal["chat.completion"] = "chat.completion"
    usage: Usage
    service_tier: str | None = None


class ChoiceDelta(BaseModel):
    """What a streamed chunk adds to one choice's message. Only the fields given are sent, as
    OpenAI does: the opening delta names the role, later ones carry only content, the last none."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None

    @model_serializer(mode="wrap")
    def _given_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {name: value for name, value in handler(self).items() if name in self.model_fields_set}


class ChunkChoice(Choice):
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(StreamChunk[ChunkChoice]):
    """One server-sent event of a streamed chat completion (the ``openai`` package's ``ChatCompletionChunk``)."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
