"""Responses of the Responses API kept with ``store: true``: read back, listed by their input
items, deleted, and followed back through ``previous_response_id``. Per tenant."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import delete

from llmos.errors import NotFoundError
from llmos.registry.db import Database
from llmos.registry.vector_tables import StoredResponseRow

_RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{32}$")
MAX_CHAIN = 64
"""Responses followed back through ``previous_response_id`` (a conversation's turns)."""


class ResponseStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def save(self, tenant: str, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        row = StoredResponseRow(
            id=response["id"],
            tenant=tenant,
            previous_response_id=response.get("previous_response_id"),
            input_items=input_items,
            response=response,
            created_at=datetime.now(UTC),
        )
        with self.db.session() as s:
            s.add(row)

    def get(self, tenant: str, response_id: str) -> StoredResponseRow:
        with self.db.session() as s:
            row = s.get(StoredResponseRow, response_id) if _RESPONSE_ID.fullmatch(response_id) else None
            if row is None or row.tenant != tenant:  # another tenant's response does not exist for the caller
                raise NotFoundError(f"Response with id '{response_id[:80]}' not found.", param="response_id")
            return row

    def delete(self, tenant: str, response_id: str) -> None:
        self.get(tenant, response_id)
        with self.db.session() as s:
            s.execute(delete(StoredResponseRow).where(StoredResponseRow.id == response_id))

    def history(self, tenant: str, response_id: str) -> list[StoredResponseRow]:
        """The conversation ending with ``response_id``, oldest turn first (at most ``MAX_CHAIN``
        turns; a turn whose predecessor was deleted starts it)."""
        turns = [self.get(tenant, response_id)]
        while turns[-1].previous_response_id and len(turns) < MAX_CHAIN:
            try:
                turns.append(self.get(tenant, turns[-1].previous_response_id))
            except NotFoundError:
                break
        return turns[::-1]
