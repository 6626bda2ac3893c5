"""Vector store request bodies (OpenAI's, plus ``embedding_model``). Unknown fields are refused
with a 400 naming them: a field is either honoured or refused."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from llmos.api.openai.common import StrictModel

MetadataKey = Annotated[str, Field(min_length=1, max_length=64)]
Metadata = Annotated[dict[MetadataKey, Annotated[str, Field(max_length=512)]], Field(max_length=16)]
FileId = Annotated[str, Field(min_length=1, max_length=64)]
MAX_FILES = 500


class Body(StrictModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ExpiresAfter(Body):
    anchor: Literal["last_active_at"]
    days: Annotated[int, Field(ge=1, le=365)]


class CreateVectorStore(Body):
    name: Annotated[str, Field(max_length=256)] | None = None
    description: Annotated[str, Field(max_length=512)] | None = None
    file_ids: Annotated[list[FileId], Field(max_length=MAX_FILES)] | None = None
    chunking_strategy: dict[str, Any] | None = None
    expires_after: ExpiresAfter | None = None
    metadata: Metadata | None = None
    embedding_model: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    """Beyond OpenAI: the embedding model of the store's chunks (default: the
    ``vector_store_embedding_model`` setting)."""


class UpdateVectorStore(Body):
    name: Annotated[str, Field(max_length=256)] | None = None
    expires_after: ExpiresAfter | None = None
    metadata: Metadata | None = None


class AttachFile(Body):
    file_id: FileId
    attributes: dict[str, Any] | None = None
    chunking_strategy: dict[str, Any] | None = None


class UpdateFile(Body):
    attributes: dict[str, Any] | None


class BatchFile(Body):
    file_id: FileId
    attributes: dict[str, Any] | None = None
    chunking_strategy: dict[str, Any] | None = None


class CreateFileBatch(Body):
    file_ids: Annotated[list[FileId], Field(min_length=1, max_length=MAX_FILES)] | None = None
    files: Annotated[list[BatchFile], Field(min_length=1, max_length=MAX_FILES)] | None = None
    attributes: dict[str, Any] | None = None
    chunking_strategy: dict[str, Any] | None = None


class HybridSearch(Body):
    embedding_weight: Annotated[float, Field(ge=0.0, le=100.0)]
    text_weight: Annotated[float, Field(ge=0.0, le=100.0)]


class RankingOptions(Body):
    ranker: Literal["none", "auto", "default-2024-11-15"] | None = None
    score_threshold: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    hybrid_search: HybridSearch | None = None
    rerank_model: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    """An extra: the model that reranks the candidates (default: the ``vector_store_rerank_model`` setting)."""


class SearchRequest(Body):
    query: (
        Annotated[str, Field(min_length=1, max_length=4096)]
        | Annotated[list[Annotated[str, Field(min_length=1, max_length=4096)]], Field(min_length=1, max_length=8)]
    )
    filters: dict[str, Any] | None = None
    max_num_results: Annotated[int, Field(ge=1, le=50)] = 10
    ranking_options: RankingOptions | None = None
    rewrite_query: bool = False

    def queries(self) -> list[str]:
        return [self.query] if isinstance(self.query, str) else list(self.query)
