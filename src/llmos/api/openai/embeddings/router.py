from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from llmos.api.context import EmbeddingContext
from llmos.api.deps import EngineDep, SettingsDep
from llmos.api.openai.embeddings.schemas import EmbeddingList, EmbeddingRequest
from llmos.api.openai.embeddings.serving import create_embeddings

router = APIRouter(tags=["embeddings"])


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def embeddings(body: EmbeddingRequest, engine: EngineDep, settings: SettingsDep, ctx: EmbeddingContext) -> Any:
    result = await create_embeddings(body, engine, settings, ctx)
    ctx.finish(body.model, result.usage.prompt_tokens, 0)
    return result.model_dump()
