"""Idempotency keys: a create request retried with the same key returns what the first one
made; the same key with a different request is a conflict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from llmos.errors import ConflictError
from llmos.registry.db import Database

RowT = TypeVar("RowT")


def find_earlier(db: Database, table: type[RowT], tenant: str, key: str, request_hash: str) -> RowT | None:
    """The row an earlier request with ``key`` created for ``tenant`` (None if none), or 409."""
    with db.session() as s:
        model: Any = table
        row = s.scalars(select(model).where(model.tenant == tenant, model.idempotency_key == key)).first()
        if row is not None and row.request_hash != request_hash:
            raise ConflictError(
                "this Idempotency-Key was used with a different request",
                param="Idempotency-Key",
                code="idempotency_key_reused",
            )
        if row is not None:
            s.expunge(row)
        return row


def insert_once(db: Database, row: RowT, companions: Sequence[object] = ()) -> tuple[RowT, bool]:
    """Insert ``row`` (with ``companions`` in the same transaction). If a concurrent request with
    the same idempotency key inserted first, return its row instead: ``(row, created)``."""
    try:
        with db.session() as s:
            s.add(row)
            s.flush()
            s.add_all(companions)
        return row, True
    except IntegrityError:
        record: Any = row
        if record.idempotency_key is None:
            raise
        earlier = find_earlier(db, type(row), record.tenant, record.idempotency_key, record.request_hash)
        if earlier is None:
            raise
        return earlier, False
