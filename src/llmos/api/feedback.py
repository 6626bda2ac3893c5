"""Feedback on stored completions (native; scope `inference`) and datasets exported from it as
fine-tuning files (scope `files`). See docs/api.md for why feedback has the shape it has."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request

from llmos.api.context import limited
from llmos.api.deps import PlatformDep
from llmos.api.openai.chat.stored import json_object, page
from llmos.errors import InvalidRequestError
from llmos.registry.feedback import check_tags
from llmos.registry.feedback_export import WELL_RATED, ExportFilter, export_feedback
from llmos.registry.metadata import check_metadata
from llmos.security import ApiKeyInfo

router = APIRouter(tags=["feedback"])
FeedbackKey = Annotated[ApiKeyInfo, Depends(limited("inference"))]
ExportKey = Annotated[ApiKeyInfo, Depends(limited("files"))]
_EXPORT_FIELDS = {"format", "model", "metadata", "tags", "created_after", "created_before", "min_score"}


def _moment(value: Any, param: str) -> datetime | None:
    """Unix seconds, as OpenAI's ``created_at`` fields are."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**37:
        raise InvalidRequestError(f"{param} must be a Unix time in seconds", param=param)
    return datetime.fromtimestamp(value, UTC)


@router.post("/v1/chat/completions/{completion_id}/feedback")
async def give_feedback(
    completion_id: str, request: Request, platform: PlatformDep, key: FeedbackKey
) -> dict[str, Any]:
    """Rate one choice of a stored completion (thumbs or 1-5), correct it, tag it, comment on it."""
    body = await json_object(request, {"rating", "correction", "tags", "comment", "choice_index"})
    given = await asyncio.to_thread(platform.feedback.add, key.tenant, key.id, completion_id, body)
    return given.public()


@router.get("/v1/feedback")
async def list_feedback(
    platform: PlatformDep,
    key: FeedbackKey,
    completion_id: Annotated[str | None, Query(max_length=64)] = None,
    tag: Annotated[list[str] | None, Query(max_length=16)] = None,
    rating: Annotated[Literal["up", "down", "1", "2", "3", "4", "5"] | None, Query()] = None,
    created_after: Annotated[int | None, Query(ge=0, lt=2**37)] = None,
    created_before: Annotated[int | None, Query(ge=0, lt=2**37)] = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """The tenant's feedback, oldest first; ``tag`` (repeatable) keeps feedback with any of them."""
    records = await asyncio.to_thread(
        platform.feedback.list,
        key.tenant,
        completion_id=completion_id,
        tags=check_tags(tag, "tag") if tag else None,
        rating=rating,
        created_after=_moment(created_after, "created_after"),
        created_before=_moment(created_before, "created_before"),
    )
    if after is not None:
        ids = [r.id for r in records]
        records = records[ids.index(after) + 1 :] if after in ids else []
    return page([r.public() for r in records[:limit]], len(records) > limit)


@router.post("/v1/feedback/exports")
async def export(request: Request, platform: PlatformDep, key: ExportKey) -> dict[str, Any]:
    """A fine-tuning file of SFT or DPO lines made from the tenant's feedback (the file object, with lineage)."""
    body = await json_object(request, _EXPORT_FIELDS)
    fmt = body.get("format")
    if fmt not in ("sft", "dpo"):
        raise InvalidRequestError('format must be "sft" or "dpo"', param="format")
    model = body.get("model")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 512):
        raise InvalidRequestError("model must be a model name", param="model")
    min_score = body.get("min_score", WELL_RATED)
    if isinstance(min_score, bool) or not isinstance(min_score, int | float) or not 0 <= min_score <= 1:
        raise InvalidRequestError("min_score must be a number from 0 to 1", param="min_score")
    filters = ExportFilter(
        model=model,
        metadata=check_metadata(body.get("metadata")),
        tags=check_tags(body.get("tags")) or None,
        created_after=_moment(body.get("created_after"), "created_after"),
        created_before=_moment(body.get("created_before"), "created_before"),
        min_score=float(min_score),
    )
    record = await asyncio.to_thread(
        export_feedback,
        platform.completions,
        platform.feedback,
        platform.files,
        tenant=key.tenant,
        fmt=fmt,
        filters=filters,
        max_bytes=platform.settings.max_upload_bytes,
    )
    platform.audit.record(
        "feedback.export",
        tenant=key.tenant,
        key_id=key.id,
        target=record.id,
        client=request.client.host if request.client else None,
        detail={"format": fmt, "lines": len(record.summary["lineage"]["lines"])},
    )
    return record.public()
