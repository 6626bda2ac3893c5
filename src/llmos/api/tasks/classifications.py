"""POST /v1/classifications: labels with scores from a sequence-classification model."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import Field

from llmos.api.context import RequestContext, admitted
from llmos.api.deps import EngineDep, SettingsDep
from llmos.api.openai.common import StrictModel
from llmos.api.tasks.common import ModelField, TextInput, listing, text_inputs
from llmos.monitoring import metrics
from llmos.monitoring.requests import served_model_label

router = APIRouter(tags=["tasks"])
ClassifyContext = Annotated[RequestContext, Depends(admitted("classification"))]


class ClassificationRequest(StrictModel):
    model: ModelField
    input: TextInput
    top_k: Annotated[int, Field(ge=1, le=1000)] | None = None
    """How many labels to return per input with their scores (default: all)."""


@router.post("/v1/classifications")
async def classify(
    body: ClassificationRequest, engine: EngineDep, settings: SettingsDep, ctx: ClassifyContext
) -> dict[str, Any]:
    """Classify each input; `label`/`score` is the most likely label, `scores` all of them, best first."""
    texts = text_inputs(body.input, settings)
    body.model = await asyncio.to_thread(ctx.route_model, body.model)
    handle = await engine.resolve(body.model)
    result = await engine.classify(handle, texts)
    model_name = served_model_label(body.model, handle.info.name)
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
        if settings.metrics_enabled:  # the feed of the model-output alert rules
            metrics.CLASSIFICATION_LABELS.labels(model_name, ranked[0][0]).inc()
            metrics.CLASSIFICATION_CONFIDENCE.labels(model_name).observe(ranked[0][1])
    ctx.finish(body.model, result.prompt_tokens, 0)
    return listing(body.model, data, result.prompt_tokens)
