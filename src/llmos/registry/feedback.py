"""Feedback on stored completions: a rating (thumbs or 1 to 5), a corrected answer, tags and a
comment, recorded with the key that gave it. Every field is checked before anything is written."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select

from llmos.errors import InvalidRequestError
from llmos.registry.completions import CompletionStore, as_utc
from llmos.registry.db import Database
from llmos.registry.tables import FeedbackRow

THUMBS = {"up": 1.0, "down": 0.0}
MAX_TAGS = 16
MAX_CORRECTION_CHARS = 32768
MAX_COMMENT_CHARS = 2048
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")


def rating_score(rating: Any) -> tuple[str | None, float | None]:
    """The rating as stored (``up``, ``down``, ``1`` .. ``5``) and on one scale from 0 to 1."""
    if rating is None:
        return None, None
    if isinstance(rating, str) and rating in THUMBS:
        return rating, THUMBS[rating]
    if isinstance(rating, int) and not isinstance(rating, bool) and 1 <= rating <= 5:
        return str(rating), (rating - 1) / 4
    raise InvalidRequestError('rating must be "up", "down" or an integer from 1 to 5', param="rating")


def check_tags(tags: Any, param: str = "tags") -> list[str]:
    if tags is None:
        return []
    if not isinstance(tags, list) or len(tags) > MAX_TAGS:
        raise InvalidRequestError(f"{param} must be a list of at most {MAX_TAGS} tags", param=param)
    for tag in tags:
        if not isinstance(tag, str) or not _TAG.fullmatch(tag):
            raise InvalidRequestError(
                f"each of {param} must be 1 to 64 letters, digits or '_.:-', starting with a letter or digit",
                param=param,
            )
    return sorted(set(tags))


def _optional_text(value: Any, param: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise InvalidRequestError(f"{param} must be a non-empty string of at most {limit} characters", param=param)
    return value


@dataclass(frozen=True)
class Feedback:
    id: str
    completion_id: str
    tenant: str
    key_id: str | None
    choice_index: int
    rating: str | None
    score: float | None
    correction: str | None
    tags: list[str]
    comment: str | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: FeedbackRow) -> Feedback:
        return cls(
            id=row.id,
            completion_id=row.completion_id,
            tenant=row.tenant,
            key_id=row.key_id,
            choice_index=row.choice_index,
            rating=row.rating,
            score=row.score,
            correction=row.correction,
            tags=list(row.tags or []),
            comment=row.comment,
            created_at=as_utc(row.created_at),
        )

    def public(self) -> dict[str, Any]:
        rating: str | int | None = self.rating
        if rating is not None and rating not in THUMBS:
            rating = int(rating)
        return {
            "id": self.id,
            "object": "chat.completion.feedback",
            "completion_id": self.completion_id,
            "choice_index": self.choice_index,
            "rating": rating,
            "score": self.score,
            "correction": self.correction,
            "tags": self.tags,
            "comment": self.comment,
            "created_at": int(self.created_at.timestamp()),
            "created_by": {"tenant": self.tenant, "key_id": self.key_id},
        }


class FeedbackStore:
    def __init__(self, db: Database, completions: CompletionStore) -> None:
        self.db = db
        self.completions = completions

    def add(self, tenant: str, key_id: str | None, completion_id: str, body: dict[str, Any]) -> Feedback:
        """Record feedback on one of ``tenant``'s stored completions (another's is 404); ``body``
        holds only the fields named below (the API refuses any other)."""
        completion = self.completions.get(tenant, completion_id)
        index = body.get("choice_index", 0)
        if not isinstance(index, int) or isinstance(index, bool) or completion.answer(index) is None:
            raise InvalidRequestError(
                f"choice_index must name one of the completion's {len(completion.response.get('choices', []))} choices",
                param="choice_index",
            )
        rating, score = rating_score(body.get("rating"))
        correction = _optional_text(body.get("correction"), "correction", MAX_CORRECTION_CHARS)
        comment = _optional_text(body.get("comment"), "comment", MAX_COMMENT_CHARS)
        tags = check_tags(body.get("tags"))
        if rating is None and correction is None and comment is None and not tags:
            raise InvalidRequestError(
                "feedback needs at least one of rating, correction, tags or comment", param="rating"
            )
        row = FeedbackRow(
            id=f"feedback-{uuid.uuid4().hex[:24]}",
            completion_id=completion.id,
            tenant=tenant,
            key_id=key_id,
            choice_index=index,
            rating=rating,
            score=score,
            correction=correction,
            tags=tags,
            comment=comment,
            created_at=datetime.now(UTC),
        )
        with self.db.session() as s:
            s.add(row)
            s.flush()
            return Feedback.from_row(row)

    def list(
        self,
        tenant: str,
        *,
        completion_id: str | None = None,
        tags: list[str] | None = None,
        rating: str | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
    ) -> list[Feedback]:
        """A tenant's feedback, oldest first; ``tags`` keeps feedback holding any of them."""
        with self.db.session() as s:
            q = select(FeedbackRow).where(FeedbackRow.tenant == tenant)
            if completion_id is not None:
                q = q.where(FeedbackRow.completion_id == completion_id)
            if rating is not None:
                q = q.where(FeedbackRow.rating == rating)
            if created_after is not None:
                q = q.where(FeedbackRow.created_at >= created_after)
            if created_before is not None:
                q = q.where(FeedbackRow.created_at < created_before)
            records = [Feedback.from_row(row) for row in s.scalars(q)]
        if tags:
            records = [f for f in records if set(f.tags) & set(tags)]
        records.sort(key=lambda f: (f.created_at, f.id))
        return records
