"""POST /v1/ner: named entities, with character offsets, from a token-classification model."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Depends

from llmos.api.context import RequestContext, admitted
from llmos.api.deps import EngineDep, SettingsDep
from llmos.api.openai.common import StrictModel
from llmos.api.tasks.common import ModelField, TextInput, listing, text_inputs

router = APIRouter(tags=["tasks"])
NerContext = Annotated[RequestContext, Depends(admitted("ner"))]


class NerRequest(StrictModel):
    model: ModelField
    input: TextInput


@router.post("/v1/ner")
async def ner(body: NerRequest, engine: EngineDep, settings: SettingsDep, ctx: NerContext) -> dict[str, Any]:
    """The entities of each input: `entity` (its type), `text`, `start`/`end` (character offsets,
    `input[start:end] == text`) and `score` (the mean probability of its words' tags)."""
    texts = text_inputs(body.input, settings)
    body.model = await asyncio.to_thread(ctx.route_model, body.model)
    result = await engine.extract_entities(await engine.resolve(body.model), texts)
    data = [
        {"object": "ner", "index": i, "entities": [asdict(entity) for entity in entities]}
        for i, entities in enumerate(result.entities)
    ]
    ctx.finish(body.model, result.prompt_tokens, 0)
    return listing(body.model, data, result.prompt_tokens)
