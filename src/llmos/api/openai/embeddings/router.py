from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from llmos.api.deps import EngineDep, InferenceKey, SettingsDep
from llmos.api.openai.embeddings.schemas import EmbeddingList, EmbeddingRequest
from llmos.api.openai.embeddings.serving import create_embeddings

router = APIRouter(tags=["embeddings"])


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def embeddings(body: EmbeddingRequest, engine: EngineDep, settings: SettingsDep, _key: InferenceKey) -> Any:
    return (await create_embeddings(body, engine, settings)).model_dump()
