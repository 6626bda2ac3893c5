"""Users' ratings of a vector store's items (its files): thumbs up or down, the latest one per user
and item kept. Recommendations read them: a user's liked items make the profile, and every item
the user rated counts as seen. Users are the application's own ids (OpenAI's ``user`` field:
an end user of the caller's application), scoped by the store, so one tenant's users are never
another's."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import select

from llmos.registry.db import Database
from llmos.registry.tables import utcnow
from llmos.registry.vector_tables import VectorItemFeedbackRow
from llmos.retrieval.stores import VectorStores

Rating = Literal["up", "down"]


@dataclass(frozen=True)
class ItemRating:
    vector_store_id: str
    file_id: str
    user: str
    rating: str
    created_at: datetime

    def public(self) -> dict[str, Any]:
        return {
            "object": "vector_store.file.feedback",
            "vector_store_id": self.vector_store_id,
            "file_id": self.file_id,
            "user": self.user,
            "rating": self.rating,
            "created_at": int(self.created_at.timestamp()),
        }


@dataclass(frozen=True)
class Taste:
    """What one user's ratings say: the items liked (most recent first) and every item rated."""

    liked: list[str]
    rated: set[str]


class ItemFeedback:
    def __init__(self, db: Database, stores: VectorStores) -> None:
        self.db = db
        self.stores = stores

    def rate(
        self, tenant: str, store_id: str, file_id: str, user: str, rating: Rating, key_id: str | None
    ) -> ItemRating:
        """Record ``user``'s rating of an item (404 unless the file is attached to the tenant's
        store); a later rating replaces an earlier one."""
        self.stores.file(tenant, store_id, file_id)
        with self.db.session() as s:
            row = s.get(VectorItemFeedbackRow, (store_id, user, file_id))
            if row is None:
                row = VectorItemFeedbackRow(vector_store_id=store_id, user=user, file_id=file_id, tenant=tenant)
                s.add(row)
            row.rating, row.key_id, row.created_at = rating, key_id, utcnow()
            return _rating(row)

    def ratings(self, tenant: str, store_id: str, user: str) -> list[ItemRating]:
        """``user``'s ratings in the tenant's store, most recent first."""
        self.stores.get(tenant, store_id)
        return [_rating(row) for row in self._rows(store_id, user)]

    def taste(self, store_id: str, user: str) -> Taste:
        rows = self._rows(store_id, user)
        return Taste([r.file_id for r in rows if r.rating == "up"], {r.file_id for r in rows})

    def _rows(self, store_id: str, user: str) -> list[VectorItemFeedbackRow]:
        with self.db.session() as s:
            query = (
                select(VectorItemFeedbackRow)
                .where(VectorItemFeedbackRow.vector_store_id == store_id, VectorItemFeedbackRow.user == user)
                .order_by(VectorItemFeedbackRow.created_at.desc())
            )
            return list(s.scalars(query))


def _rating(row: VectorItemFeedbackRow) -> ItemRating:
    return ItemRating(row.vector_store_id, row.file_id, row.user, row.rating, row.created_at)
