"""Stored chat completions: what a tenant asked a model and what it answered, kept when the
request said ``store: true``, listed and filtered as OpenAI's stored completions are, and
deleted past their retention."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, delete, or_, select

from llmos.errors import NotFoundError
from llmos.registry.db import Database
from llmos.registry.tables import StoredCompletionRow

_COMPLETION_ID = re.compile(r"^chatcmpl-[0-9a-f]{24}$")


def as_utc(moment: datetime) -> datetime:
    """SQLite hands datetimes back without their zone; every stored one is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class StoredCompletion:
    id: str
    tenant: str
    key_id: str | None
    model: str
    messages: list[dict[str, Any]]
    request: dict[str, Any]
    response: dict[str, Any]
    metadata: dict[str, str]
    created_at: datetime

    @classmethod
    def from_row(cls, row: StoredCompletionRow) -> StoredCompletion:
        return cls(
            id=row.id,
            tenant=row.tenant,
            key_id=row.key_id,
            model=row.model,
            messages=list(row.messages),
            request=dict(row.request or {}),
            response=dict(row.response),
            metadata=dict(row.completion_metadata or {}),
            created_at=as_utc(row.created_at),
        )

    def public(self) -> dict[str, Any]:
        """OpenAI's stored chat.completion: the answer as it was sent, with its metadata and request fields."""
        return {**self.response, **self.request, "metadata": self.metadata}

    def public_messages(self) -> list[dict[str, Any]]:
        """The request's messages as OpenAI lists them: each with an id of its own."""
        return [{"id": f"{self.id}-{i}", "content_parts": None, **m} for i, m in enumerate(self.messages)]

    def answer(self, choice_index: int) -> str | None:
        """The text of one of its choices (None: it has no such choice)."""
        choices = self.response.get("choices", [])
        if not 0 <= choice_index < len(choices):
            return None
        return str(choices[choice_index]["message"].get("content") or "")


def _answered_by(model: str) -> ColumnElement[bool]:
    """Completions of ``model``: a bare name also matches each of its versions, since a request
    through an alias is stored under the version that answered it (``name@N``); ``name@N`` matches
    that version alone."""
    column = StoredCompletionRow.model
    if "@" in model:
        return column == model
    return or_(column == model, column.startswith(f"{model}@", autoescape=True))


def _not_found(completion_id: str) -> NotFoundError:
    return NotFoundError(f"No chat completion found with id '{completion_id[:80]}'", param="completion_id")


class CompletionStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def save(
        self,
        *,
        completion_id: str,
        tenant: str,
        key_id: str | None,
        model: str,
        messages: list[dict[str, Any]],
        request: dict[str, Any],
        response: dict[str, Any],
        metadata: dict[str, str] | None,
    ) -> None:
        with self.db.session() as s:
            s.add(
                StoredCompletionRow(
                    id=completion_id,
                    tenant=tenant,
                    key_id=key_id,
                    model=model,
                    messages=messages,
                    request=request,
                    response=response,
                    completion_metadata=metadata,
                    created_at=datetime.now(UTC),
                )
            )

    def get(self, tenant: str, completion_id: str) -> StoredCompletion:
        """A tenant's stored completion; another tenant's does not exist for it (404)."""
        if not _COMPLETION_ID.fullmatch(completion_id):
            raise _not_found(completion_id)
        with self.db.session() as s:
            row = s.get(StoredCompletionRow, completion_id)
            if row is None or row.tenant != tenant:
                raise _not_found(completion_id)
            return StoredCompletion.from_row(row)

    def list(
        self,
        tenant: str,
        *,
        model: str | None = None,
        metadata: dict[str, str] | None = None,
        created_after: datetime | None = None,
        created_before: datetime | None = None,
        after: str | None = None,
        limit: int | None = 20,
        order: str = "asc",
    ) -> tuple[list[StoredCompletion], bool]:
        """A page of a tenant's stored completions, oldest first unless ``order`` is ``desc``;
        ``model`` keeps those of that model (a bare name: of any of its versions), ``metadata``
        those holding every one of its pairs. Returns the page and whether more follow."""
        with self.db.session() as s:
            q = select(StoredCompletionRow).where(StoredCompletionRow.tenant == tenant)
            if model is not None:
                q = q.where(_answered_by(model))
            if created_after is not None:
                q = q.where(StoredCompletionRow.created_at >= created_after)
            if created_before is not None:
                q = q.where(StoredCompletionRow.created_at < created_before)
            records = [StoredCompletion.from_row(row) for row in s.scalars(q)]
        wanted = (metadata or {}).items()
        records = [r for r in records if all(r.metadata.get(k) == v for k, v in wanted)]
        records.sort(key=lambda r: (r.created_at, r.id), reverse=order == "desc")
        if after is not None:
            ids = [r.id for r in records]
            records = records[ids.index(after) + 1 :] if after in ids else []
        if limit is None:
            return records, False
        return records[:limit], len(records) > limit

    def update_metadata(self, tenant: str, completion_id: str, metadata: dict[str, str] | None) -> StoredCompletion:
        """Replace a stored completion's metadata (the one change OpenAI allows)."""
        self.get(tenant, completion_id)
        with self.db.session() as s:
            row = s.get(StoredCompletionRow, completion_id)
            if row is None or row.tenant != tenant:  # deleted meanwhile
                raise _not_found(completion_id)
            row.completion_metadata = metadata
        return self.get(tenant, completion_id)

    def delete(self, tenant: str, completion_id: str) -> None:
        """Delete a stored completion and the feedback given on it."""
        self.get(tenant, completion_id)
        with self.db.session() as s:
            q = delete(StoredCompletionRow).where(
                StoredCompletionRow.id == completion_id, StoredCompletionRow.tenant == tenant
            )
            if s.execute(q).rowcount != 1:  # type: ignore[attr-defined]
                raise _not_found(completion_id)

    def delete_older_than(self, days: int, *, now: datetime | None = None) -> int:
        """Delete completions stored more than ``days`` days ago (the retention), with their feedback."""
        cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
        with self.db.session() as s:
            q = delete(StoredCompletionRow).where(StoredCompletionRow.created_at < cutoff)
            return int(s.execute(q).rowcount or 0)  # type: ignore[attr-defined]
