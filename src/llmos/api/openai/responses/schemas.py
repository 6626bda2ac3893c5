"""Responses API request body (OpenAI's). A field this server does not implement is refused with a
400 naming it (``extra="forbid"``), never silently dropped."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from llmos.api.openai.common import StrictModel
from llmos.api.openai.vector_stores.schemas import Metadata, RankingOptions

Text = Annotated[str, Field(max_length=1_000_000)]


class Body(StrictModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class InputText(Body):
    type: Literal["input_text", "output_text"]
    text: Text
    annotations: list[dict[str, Any]] | None = None
    """Accepted on an echoed assistant message's ``output_text``; not read."""
    logprobs: list[dict[str, Any]] | None = None


class InputMessage(Body):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | Annotated[list[InputText], Field(min_length=1, max_length=256)]
    id: Annotated[str, Field(max_length=64)] | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


FileSearchRanking = RankingOptions
"""As a vector store search's (``ranker`` ``none`` too, and the ``rerank_model`` extra)."""


class FileSearchTool(Body):
    type: Literal["file_search"]
    vector_store_ids: Annotated[list[Annotated[str, Field(max_length=64)]], Field(min_length=1, max_length=8)]
    max_num_results: Annotated[int, Field(ge=1, le=50)] | None = None
    filters: dict[str, Any] | None = None
    ranking_options: FileSearchRanking | None = None


class TextFormat(Body):
    type: Literal["text"]


class TextOptions(Body):
    format: TextFormat | None = None


class CreateResponse(Body):
    model: Annotated[str, Field(min_length=1, max_length=512)]
    input: (
        Annotated[str, Field(min_length=1, max_length=1_000_000)]
        | Annotated[list[InputMessage], Field(min_length=1, max_length=1024)]
    )
    instructions: Text | None = None
    previous_response_id: Annotated[str, Field(max_length=64)] | None = None
    store: bool = True
    stream: bool = False
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    tools: Annotated[list[FileSearchTool], Field(max_length=1)] | None = None
    tool_choice: Literal["auto", "none", "required"] | None = None
    include: list[Literal["file_search_call.results"]] | None = None
    metadata: Metadata | None = None
    text: TextOptions | None = None
    user: Annotated[str, Field(max_length=256)] | None = None
    parallel_tool_calls: bool | None = None
    truncation: Literal["disabled"] | None = None

    def messages(self) -> list[InputMessage]:
        if isinstance(self.input, str):
            return [InputMessage(role="user", content=self.input)]
        return list(self.input)
