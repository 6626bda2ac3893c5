"""Embeddings: validation, optional truncation to ``dimensions`` (re-normalised), base64 encoding."""

from __future__ import annotations

import asyncio
import base64
import math

import numpy as np

from llmos.api.context import RequestContext
from llmos.api.openai.common import check_token_ids
from llmos.api.openai.embeddings.schemas import (
    Embedding,
    EmbeddingList,
    EmbeddingRequest,
    EmbeddingUsage,
)
from llmos.config import Settings
from llmos.engine.protocol import EngineClient
from llmos.errors import InvalidRequestError


def shorten(vector: list[float], dimensions: int) -> list[float]:
    """Keep the first ``dimensions`` values and re-normalise, as OpenAI does for ``dimensions``."""
    head = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


def encode_base64(vector: list[float]) -> str:
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()


async def create_embeddings(
    req: EmbeddingRequest, engine: EngineClient, settings: Settings, ctx: RequestContext
) -> EmbeddingList:
    items = req.items()
    if not items:
        raise InvalidRequestError("input must not be empty", param="input")
    if len(items) > settings.max_embedding_inputs:
        raise InvalidRequestError(f"at most {settings.max_embedding_inputs} inputs per request", param="input")
    if any(isinstance(x, str) and not x for x in items):
        raise InvalidRequestError("input strings must not be empty", param="input")
    req.model = await asyncio.to_thread(ctx.route_model, req.model, req.user)
    handle = await engine.resolve(req.model)
    info = handle.info
    if info.task != "embedding":
        raise InvalidRequestError(f"model {req.model} is a {info.task} model, not an embedding model", param="model")
    for item in items:
        if not isinstance(item, str):
            check_token_ids(item, info, param="input")
    result = await engine.embed(handle, items)
    width = len(result.vectors[0]) if result.vectors else 0
    if req.dimensions is not None and req.dimensions > width:
        raise InvalidRequestError(f"dimensions must be at most {width} for {req.model}", param="dimensions")
    data = []
    for i, vector in enumerate(result.vectors):
        if req.dimensions is not None and req.dimensions < width:
            vector = shorten(vector, req.dimensions)
        data.append(Embedding(index=i, embedding=encode_base64(vector) if req.encoding_format == "base64" else vector))
    return EmbeddingList(
        data=data,
        model=req.model,
        usage=EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens),
    )
