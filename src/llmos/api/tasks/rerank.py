"""POST /v1/score (vLLM's shape) and /v1/rerank (Cohere's and Jina's, as vLLM serves it): how
relevant documents are to a query, from a cross-encoder or a causal model
(``EngineClient.score_pairs``). Every pair of a request goes to the engine as one scoring job;
bad input is refused, naming its field, before any of it is queued."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from llmos.api.context import RequestContext, admitted
from llmos.api.deps import EngineDep, SettingsDep
from llmos.api.openai.common import StrictModel, new_id, now
from llmos.api.tasks.common import ModelField
from llmos.config import Settings
from llmos.engine.protocol import EngineClient, PairScores
from llmos.errors import InvalidRequestError

router = APIRouter(tags=["tasks"])
ScoreContext = Annotated[RequestContext, Depends(admitted("score"))]
Text = Annotated[str, Field(min_length=1)]


class DocumentIn(StrictModel):
    text: Text


class ScoreRequest(StrictModel):
    model: ModelField
    text_1: Text | list[Text]
    """The query (or queries, one per ``text_2``)."""
    text_2: Text | list[Text]


class RerankRequest(StrictModel):
    model: ModelField
    query: Text
    documents: list[str | DocumentIn]
    top_n: Annotated[int, Field(ge=1)] | None = None
    """How many of the most relevant documents to return (default: all)."""
    return_documents: bool = True


class ScoreData(BaseModel):
    index: int
    object: str = "score"
    score: float


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: DocumentIn | None = None


def _check_count(count: int, settings: Settings, param: str) -> None:
    if count == 0:
        raise InvalidRequestError("at least one document is needed", param=param)
    if count > settings.max_embedding_inputs:
        raise InvalidRequestError(f"at most {settings.max_embedding_inputs} documents per request", param=param)


async def _score(engine: EngineClient, ctx: RequestContext, model: str, pairs: list[tuple[str, str]]) -> PairScores:
    model = await asyncio.to_thread(ctx.route_model, model)
    handle = await engine.resolve(model)
    result = await engine.score_pairs(handle, pairs, tenant=ctx.tenant)
    ctx.finish(model, result.prompt_tokens, 0)
    return result


@router.post("/v1/score")
async def score(body: ScoreRequest, engine: EngineDep, settings: SettingsDep, ctx: ScoreContext) -> dict[str, Any]:
    """The relevance of each ``text_2`` to ``text_1`` (one query for all, or one query each)."""
    documents = [body.text_2] if isinstance(body.text_2, str) else body.text_2
    _check_count(len(documents), settings, "text_2")
    queries = [body.text_1] * len(documents) if isinstance(body.text_1, str) else body.text_1
    if len(queries) != len(documents):
        raise InvalidRequestError("text_1 must be one text or as many texts as text_2", param="text_1")
    result = await _score(engine, ctx, body.model, list(zip(queries, documents, strict=True)))
    return {
        "id": new_id("score"),
        "object": "list",
        "created": now(),
        "model": body.model,
        "data": [ScoreData(index=i, score=s).model_dump() for i, s in enumerate(result.scores)],
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }


@router.post("/v1/rerank")
async def rerank(body: RerankRequest, engine: EngineDep, settings: SettingsDep, ctx: ScoreContext) -> dict[str, Any]:
    """The documents, most relevant to ``query`` first (``top_n`` of them), with their index."""
    _check_count(len(body.documents), settings, "documents")
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    if any(not t.strip() for t in texts):
        raise InvalidRequestError("documents must not be empty", param="documents")
    result = await _score(engine, ctx, body.model, [(body.query, t) for t in texts])
    ranked = sorted(range(len(texts)), key=lambda i: -result.scores[i])[: body.top_n]
    results = [
        RerankResult(
            index=i,
            relevance_score=result.scores[i],
            document=DocumentIn(text=texts[i]) if body.return_documents else None,
        ).model_dump(exclude_none=True)
        for i in ranked
    ]
    return {
        "id": new_id("rerank"),
        "model": body.model,
        "results": results,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
