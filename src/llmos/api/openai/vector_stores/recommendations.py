"""POST /v1/vector_stores/{vector_store_id}/recommendations (beyond OpenAI, scope `files`): the
store's files as items, recommended by the profile of the items a user liked (retrieval/recommend.py)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import Field

from llmos.api.openai.vector_stores.router import StoresKey
from llmos.api.openai.vector_stores.schemas import Body, FileId
from llmos.api.openai.vector_stores.serving import Retrieval
from llmos.retrieval.recommend import recommend

router = APIRouter(tags=["vector_stores"])


class RecommendationRequest(Body):
    liked_file_ids: Annotated[list[FileId], Field(min_length=1, max_length=100)]
    """The items the user liked (processed files of the store)."""
    exclude_file_ids: Annotated[list[FileId], Field(max_length=10_000)] = []
    """Items the user has already seen, never recommended (liked ones never are either)."""
    max_num_results: Annotated[int, Field(ge=1, le=50)] = 10
    filters: dict[str, Any] | None = None


@router.post("/v1/vector_stores/{vector_store_id}/recommendations")
async def recommend_items(
    vector_store_id: str, body: RecommendationRequest, request: Request, key: StoresKey
) -> dict[str, Any]:
    retrieval = Retrieval(request, key)
    stores = retrieval.platform.vector_stores
    row = await asyncio.to_thread(stores.usable, key.tenant, vector_store_id)
    await retrieval.check_filters([row], body.filters)
    items = await asyncio.to_thread(
        recommend,
        stores,
        row.id,
        list(dict.fromkeys(body.liked_file_ids)),
        exclude=set(body.exclude_file_ids),
        max_results=body.max_num_results,
        flt=body.filters,
    )
    await asyncio.to_thread(stores.touch, row)
    return {"object": "list", "data": [item.public() for item in items]}
