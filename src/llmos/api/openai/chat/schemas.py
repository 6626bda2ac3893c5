"""Chat completions: request and response shapes (OpenAI's)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from llmos.api.openai.chat.tools import MAX_TOOLS, Tool, ToolCallIn, ToolChoice
from llmos.api.openai.common import Choice, OpenAIRequest, ResponseObject, SamplingFields, StreamChunk, Usage
from llmos.api.openai.scoring import PromptLogprobsOut
from llmos.api.openai.structured import StructuredFields


class TextPart(OpenAIRequest):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIRequest):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[TextPart], Field(min_length=1)] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCallIn], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    """An assistant message's calls, echoed back by the client."""
    tool_call_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    """A tool message's answer to that call."""

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def rendered(self) -> dict[str, Any]:
        """The message as the chat template takes it."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class PredictionContent(OpenAIRequest):
    """OpenAI's Predicted Outputs: text the answer is expected to repeat (``chat/prediction.py``)."""

    type: Literal["content"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields, StructuredFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=4096)]
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    prompt_logprobs: Annotated[int, Field(ge=0)] | None = None
    """vLLM's extra: every prompt token's logprob and this many most likely tokens."""
    store: bool | None = False
    """Keep the request and its answer as a stored completion of the caller's tenant."""
    metadata: dict[str, Any] | None = None
    """Up to 16 string pairs kept with a stored completion (checked with the job metadata's rules)."""
    prediction: PredictionContent | None = None


class TopLogprobOut(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprobOut):
    top_logprobs: list[TopLogprobOut]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class FunctionCallOut(BaseModel):
    name: str
    arguments: str


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(Choice):
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(ResponseObject[ChatChoice]):
    object: Literal["chat.completion"] = "chat.completion"
    usage: Usage
    prompt_logprobs: PromptLogprobsOut | None = None
    """vLLM's extra, when the request asked for ``prompt_logprobs``."""
    service_tier: str | None = None


class GivenFieldsOnly(BaseModel):
    """Streamed deltas send only the fields given, as OpenAI does (the ``openai`` client joins
    deltas field by field, and a null would overwrite what an earlier one gave)."""

    @model_serializer(mode="wrap")
    def _given_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {name: value for name, value in handler(self).items() if name in self.model_fields_set}


class FunctionDelta(GivenFieldsOnly):
    name: str | None = None
    arguments: str


class ToolCallDelta(GivenFieldsOnly):
    """A streamed call: its first delta carries ``id``, ``type`` and the name, later ones more of
    the arguments, all under the call's ``index``."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionDelta


class ChoiceDelta(GivenFieldsOnly):
    """What a streamed chunk adds to one choice's message: the opening delta names the role,
    later ones carry only content (or tool calls), the last none."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(Choice):
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(StreamChunk[ChunkChoice]):
    """One server-sent event of a streamed chat completion (the ``openai`` package's ``ChatCompletionChunk``)."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
