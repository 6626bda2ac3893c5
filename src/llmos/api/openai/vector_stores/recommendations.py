"""Recommendations (beyond OpenAI, scope `files`): a store's files as items, recommended by the
profile of the items a user liked (retrieval/recommend.py); the likes given in the request, or read
from the users' ratings of items (retrieval/item_feedback.py):

- POST /v1/vector_stores/{vector_store_id}/files/{file_id}/feedback: a user rates an item;
- GET /v1/vector_stores/{vector_store_id}/feedback?user=...: that user's ratings;
- POST /v1/vector_stores/{vector_store_id}/recommendations: items for ``liked_file_ids``, a
  ``user``'s ratings, or both."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from pydantic import Field

from llmos.api.openai.vector_stores.router import StoresKey
from llmos.api.openai.vector_stores.schemas import Body, FileId
from llmos.api.openai.vector_stores.serving import Retrieval
from llmos.errors import InvalidRequestError
from llmos.retrieval.item_feedback import ItemFeedback, Rating
from llmos.retrieval.recommend import recommend

router = APIRouter(tags=["vector_stores"])


User = Annotated[str, Field(min_length=1, max_length=256)]
"""An end user of the caller's application (OpenAI's ``user``), as the application names them."""


class RecommendationRequest(Body):
    liked_file_ids: Annotated[list[FileId], Field(max_length=100)] = []
    """The items the user liked (processed files of the store)."""
    user: User | None = None
    """Whose ratings to read: the items they rated up are liked, every item they rated is seen."""
    exclude_file_ids: Annotated[list[FileId], Field(max_length=10_000)] = []
    """Items the user has already seen, never recommended (liked ones never are either)."""
    max_num_results: Annotated[int, Field(ge=1, le=50)] = 10
    filters: dict[str, Any] | None = None


class ItemFeedbackRequest(Body):
    user: User
    rating: Rating


MAX_LIKES = 100
"""Liked items a profile is made of at most (a user's most recent likes)."""


def item_feedback(retrieval: Retrieval) -> ItemFeedback:
    return ItemFeedback(retrieval.platform.db, retrieval.platform.vector_stores)


@router.post("/v1/vector_stores/{vector_store_id}/files/{file_id}/feedback")
async def rate_item(
    vector_store_id: str, file_id: str, body: ItemFeedbackRequest, request: Request, key: StoresKey
) -> dict[str, Any]:
    """A user's thumbs up or down on one item; their latest rating of it is the one kept."""
    feedback = item_feedback(Retrieval(request, key))
    given = await asyncio.to_thread(feedback.rate, key.tenant, vector_store_id, file_id, body.user, body.rating, key.id)
    return given.public()


@router.get("/v1/vector_stores/{vector_store_id}/feedback")
async def list_item_feedback(
    vector_store_id: str, request: Request, key: StoresKey, user: Annotated[str, Query(min_length=1, max_length=256)]
) -> dict[str, Any]:
    feedback = item_feedback(Retrieval(request, key))
    ratings = await asyncio.to_thread(feedback.ratings, key.tenant, vector_store_id, user)
    return {"object": "list", "data": [r.public() for r in ratings]}


@router.post("/v1/vector_stores/{vector_store_id}/recommendations")
async def recommend_items(
    vector_store_id: str, body: RecommendationRequest, request: Request, key: StoresKey
) -> dict[str, Any]:
    retrieval = Retrieval(request, key)
    stores = retrieval.platform.vector_stores
    row = await asyncio.to_thread(stores.usable, key.tenant, vector_store_id)
    await retrieval.check_filters([row], body.filters)
    liked, seen = list(dict.fromkeys(body.liked_file_ids)), set(body.exclude_file_ids)
    if body.user is not None:
        taste = await asyncio.to_thread(item_feedback(retrieval).taste, row.id, body.user)
        present = {f.file_id for f in await asyncio.to_thread(stores.files_of, row.id) if f.status == "completed"}
        # Items rated before they were detached are no longer items: left out, not an error.
        liked = list(dict.fromkeys([*liked, *(f for f in taste.liked if f in present)]))[:MAX_LIKES]
        seen |= taste.rated
    if not liked:
        param = "user" if body.user is not None else "liked_file_ids"
        message = "no liked item to recommend from: give liked_file_ids or a user who rated items up"
        raise InvalidRequestError(message, param=param)
    items = await asyncio.to_thread(
        recommend, stores, row.id, liked, exclude=seen, max_results=body.max_num_results, flt=body.filters
    )
    await asyncio.to_thread(stores.touch, row)
    return {"object": "list", "data": [item.public() for item in items]}
