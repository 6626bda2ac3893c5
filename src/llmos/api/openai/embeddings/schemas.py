"""Embeddings: request and response shapes (OpenAI's)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from llmos.api.openai.common import OpenAIRequest

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class EmbeddingRequest(OpenAIRequest):
    model: Annotated[str, Field(min_length=1, max_length=512)]
    input: str | list[str] | TokenIds | list[TokenIds]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    def items(self) -> list[str] | list[list[int]]:
        """The input as a list of strings or a list of token-id lists."""
        value = self.input
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(x, int) for x in value):
            return [[int(x) for x in value]]  # type: ignore[arg-type]
        return value  # type: ignore[return-value]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
