"""POST /v1/classifications: labels with scores from a sequence-classification model."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import Field

from llmos.api.context import RequestContext, admitted
from llmos.api.deps import EngineDep, SettingsDep
from llmos.api.openai.common import StrictModel
from llmos.errors import InvalidRequestError

router = APIRouter(tags=["tasks"])
ClassifyContext = Annotated[RequestContext, Depends(admitted("classification"))]


class ClassificationRequest(StrictModel):
    model: Annotated[str, Field(min_length=1, max_length=512)]
    input: str | Annotated[list[str], Field(min_length=1)]
    top_k: Annotated[int, Field(ge=1, le=1000)] | None = None
    """How many labels to return per input with their scores (default: all)."""


@router.post("/v1/classifications")
async def classify(
    body: ClassificationRequest, engine: EngineDep, settings: SettingsDep, ctx: ClassifyContext
) -> dict[str, Any]:
    """Classify each input; `label`/`score` is the most likely label, `scores` all of them, best first."""
    texts = [body.input] if isinstance(body.input, str) else body.input
    if len(texts) > settings.max_embedding_inputs:
        raise InvalidRequestError(f"at most {settings.max_embedding_inputs} inputs per request", param="input")
    if any(not t.strip() for t in texts):
        raise InvalidRequestError("inputs must not be empty", param="input")
    await asyncio.to_thread(ctx.check_model, body.model)
    result = await engine.classify(body.model, texts)
    data = []
    for i, row in enumerate(result.scores):
        ranked = sorted(zip(result.labels, row, strict=True), key=lambda pair: -pair[1])[: body.top_k]
        data.append(
            {
                "object": "classification",
                "index": i,
                "label": ranked[0][0],
                "score": ranked[0][1],
                "scores": [{"label": label, "score": score} for label, score in ranked],
            }
        )
    ctx.finish(body.model, result.prompt_tokens, 0)
    return {
        "object": "list",
        "model": body.model,
        "data": data,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
