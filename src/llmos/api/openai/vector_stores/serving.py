"""What the vector store routes and the Responses API's ``file_search`` tool share: embedding
through the engine, attaching files for processing, and search across stores."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from fastapi import Request

from llmos.api.deps import get_engine, get_platform
from llmos.api.openai.vector_stores.schemas import RankingOptions
from llmos.engine.protocol import EngineClient
from llmos.errors import InvalidRequestError
from llmos.platform import Platform
from llmos.registry.vector_tables import VectorStoreRow
from llmos.retrieval.chunking import StaticChunking
from llmos.retrieval.filters import Attributes, check_attributes, check_filter
from llmos.retrieval.ingest import Embed, FileJob, Ingestion
from llmos.retrieval.search import Hybrid, SearchHit, search_store
from llmos.security import ApiKeyInfo

FileSpec = tuple[str, dict[str, Any] | None, dict[str, Any] | None]
"""A file to attach: its id, attributes and chunking strategy as the request gave them."""


RESUMED_KEY = "-"
"""The key charged for embedding files whose processing a restart resumed."""
RERANK_DEPTH = 20
"""Candidates a reranked search takes from similarity search (or ``max_num_results`` when more)."""


def engine_embedder(engine: EngineClient, platform: Platform, tenant: str, key_id: str) -> Embed:
    """Embeddings through the engine's one embedding path, charged to ``tenant`` as embeddings.
    A text longer than the model reads is embedded by its first tokens, as sentence-transformers
    truncates (the engine refuses such inputs from clients instead; a chunk is not a client's)."""

    async def embed(model: str, texts: list[str]) -> list[list[float]]:
        handle = await engine.resolve(model)
        room = handle.info.context_length - 2  # the engine adds the model's two special tokens again
        ids = [(await engine.encode_text(handle, text))[1:-1][:room] for text in texts]
        result = await engine.embed(handle, ids)
        platform.record_usage(
            tenant=tenant,
            key_id=key_id,
            model=model,
            kind="embedding",
            prompt_tokens=result.prompt_tokens,
            completion_tokens=0,
        )
        return result.vectors

    return embed


def resume_ingestion(platform: Platform, engine: EngineClient) -> Ingestion:
    """The server's ingestion, with the files a stopped server left in_progress queued again."""
    ingestion = Ingestion(platform.vector_stores, platform.files)
    for row, model in platform.vector_stores.unfinished():
        job = FileJob(
            tenant=row.tenant,
            vector_store_id=row.vector_store_id,
            file_id=row.file_id,
            filename=row.filename,
            chunking=StaticChunking(row.max_chunk_size_tokens, row.chunk_overlap_tokens),
            embedding_model=model,
        )
        ingestion.submit(job, engine_embedder(engine, platform, row.tenant, RESUMED_KEY))
    return ingestion


class Retrieval:
    """One request's access to vector stores: the caller's key, the platform and the engine."""

    def __init__(self, request: Request, key: ApiKeyInfo) -> None:
        self.platform: Platform = get_platform(request)
        self.engine: EngineClient = get_engine(request)
        self.ingestion: Ingestion = request.app.state.ingestion
        self.key = key

    @property
    def tenant(self) -> str:
        return self.key.tenant

    def embedder(self) -> Embed:
        return engine_embedder(self.engine, self.platform, self.tenant, self.key.id)

    async def check_embedding_model(self, model: str) -> None:
        """404 unless the caller may use ``model``; 400 unless it is an embedding model."""
        tenant = None if "admin" in self.key.scopes else self.tenant
        await asyncio.to_thread(self.platform.registry.get, model, tenant=tenant)
        handle = await self.engine.resolve(model)
        if handle.info.task != "embedding":
            raise InvalidRequestError(
                f"model {model} is a {handle.info.task} model, not an embedding model", param="embedding_model"
            )

    async def attach(self, store: VectorStoreRow, specs: Sequence[FileSpec], batch_id: str | None = None) -> list[str]:
        """Check every file first (nothing is attached if one is refused), then attach them
        ``in_progress`` and queue their processing."""
        checked: list[tuple[str, str, Attributes | None, StaticChunking]] = []
        for file_id, attributes, chunking in specs:
            record = await asyncio.to_thread(self.platform.files.get, self.tenant, file_id)
            checked.append((file_id, record.filename, check_attributes(attributes), StaticChunking.parse(chunking)))
        rows = await asyncio.to_thread(self.platform.vector_stores.attach, self.tenant, store.id, checked, batch_id)
        embed = self.embedder()
        for row in rows:
            job = FileJob(
                tenant=self.tenant,
                vector_store_id=store.id,
                file_id=row.file_id,
                filename=row.filename,
                chunking=StaticChunking(row.max_chunk_size_tokens, row.chunk_overlap_tokens),
                embedding_model=store.embedding_model,
            )
            self.ingestion.submit(job, embed)
        return [row.file_id for row in rows]

    async def check_filters(self, rows: Sequence[VectorStoreRow], filters: dict[str, Any] | None) -> None:
        """400 naming ``filters`` unless well formed over keys some file of the stores has."""
        if filters is not None:
            stores = self.platform.vector_stores
            files = [f for row in rows for f in await asyncio.to_thread(stores.files_of, row.id)]
            check_filter(filters, {k for f in files for k in (f.attributes or {})})

    async def search_ranked(
        self,
        store_ids: Sequence[str],
        queries: Sequence[str],
        *,
        max_results: int,
        filters: dict[str, Any] | None,
        ranking: RankingOptions | None,
    ) -> list[SearchHit]:
        """A search as a request's ``ranking_options`` ask: hybrid or not, reranked unless the
        ranker is ``none`` or no rerank model is named (by the request or the settings), cut at
        ``score_threshold`` (the reranker's score when reranked)."""
        ranking = ranking or RankingOptions()
        hybrid = ranking.hybrid_search
        reranker = ranking.rerank_model or self.platform.settings.vector_store_rerank_model
        if ranking.ranker == "none":
            if ranking.rerank_model:
                raise InvalidRequestError("rerank_model needs a ranker other than none", param="ranking_options")
            reranker = None
        threshold = ranking.score_threshold or 0.0
        hits = await self.search(
            store_ids,
            queries,
            max_results=max(max_results, RERANK_DEPTH) if reranker else max_results,
            filters=filters,
            score_threshold=0.0 if reranker else threshold,
            hybrid=Hybrid(hybrid.embedding_weight, hybrid.text_weight) if hybrid else None,
        )
        if reranker and hits:
            hits = [h for h in await self.rerank(reranker, queries, hits) if h.score >= threshold]
        return hits[:max_results]

    async def rerank(self, model: str, queries: Sequence[str], hits: list[SearchHit]) -> list[SearchHit]:
        """``hits`` scored by ``model``'s relevance to the best matching query, best first:
        the engine's one scoring path (as ``/v1/rerank``), charged to the caller as ``score``."""
        tenant = None if "admin" in self.key.scopes else self.tenant
        await asyncio.to_thread(self.platform.registry.get, model, tenant=tenant)  # 404 for another's model
        handle = await self.engine.resolve(model)
        pairs = [(query, hit.text) for query in queries for hit in hits]
        # The chunks are the platform's own cut, sized for the embedding model: one longer than
        # the reranker takes is scored on its beginning rather than failing the client's search.
        result = await self.engine.score_pairs(handle, pairs, tenant=self.tenant, truncate=True)
        self.platform.record_usage(
            tenant=self.tenant,
            key_id=self.key.id,
            model=model,
            kind="score",
            prompt_tokens=result.prompt_tokens,
            completion_tokens=0,
        )
        n = len(hits)
        best = [max(result.scores[q * n + i] for q in range(len(queries))) for i in range(n)]
        scored = [replace(hit, score=round(score, 6)) for hit, score in zip(hits, best, strict=True)]
        return sorted(scored, key=lambda h: -h.score)

    async def search(
        self,
        store_ids: Sequence[str],
        queries: Sequence[str],
        *,
        max_results: int,
        filters: dict[str, Any] | None = None,
        score_threshold: float = 0.0,
        hybrid: Hybrid | None = None,
    ) -> list[SearchHit]:
        """The best chunks of every store for any of ``queries``, best first."""
        stores = self.platform.vector_stores
        rows = [await asyncio.to_thread(stores.usable, self.tenant, store_id) for store_id in store_ids]
        await self.check_filters(rows, filters)
        embed = self.embedder()
        best: dict[tuple[str, str], SearchHit] = {}
        for row in rows:
            vectors = await embed(row.embedding_model, list(queries))
            for query, vector in zip(queries, vectors, strict=True):
                hits = await asyncio.to_thread(
                    search_store,
                    stores,
                    row.id,
                    vector,
                    query,
                    max_results=max_results,
                    flt=filters,
                    score_threshold=score_threshold,
                    hybrid=hybrid,
                )
                for hit in hits:
                    key = (hit.file_id, hit.text)
                    if key not in best or best[key].score < hit.score:
                        best[key] = hit
            await asyncio.to_thread(stores.touch, row)
        return sorted(best.values(), key=lambda h: -h.score)[:max_results]
