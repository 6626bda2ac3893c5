"""Vector stores, their files and file batches as the API shows them (OpenAI's objects)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from llmos.registry.vector_tables import VectorStoreFileBatchRow, VectorStoreFileRow, VectorStoreRow

FILE_STATES = ("in_progress", "completed", "cancelled", "failed")


def epoch(moment: datetime) -> int:
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp())


def file_counts(statuses: Iterable[str]) -> dict[str, int]:
    counts = Counter(statuses)
    return {**{state: counts.get(state, 0) for state in FILE_STATES}, "total": sum(counts.values())}


def expires_at(row: VectorStoreRow) -> datetime | None:
    if row.expires_after_days is None:
        return None
    active = row.last_active_at if row.last_active_at.tzinfo else row.last_active_at.replace(tzinfo=UTC)
    return active + timedelta(days=row.expires_after_days)


def is_expired(row: VectorStoreRow) -> bool:
    moment = expires_at(row)
    return moment is not None and moment <= datetime.now(UTC)


def store_object(row: VectorStoreRow, files: list[VectorStoreFileRow]) -> dict[str, Any]:
    counts = file_counts(f.status for f in files)
    expiry = expires_at(row)
    status = "expired" if is_expired(row) else "in_progress" if counts["in_progress"] else "completed"
    return {
        "id": row.id,
        "object": "vector_store",
        "created_at": epoch(row.created_at),
        "name": row.name,
        "description": row.description,
        "usage_bytes": sum(f.usage_bytes for f in files),
        "file_counts": counts,
        "status": status,
        "expires_after": (
            {"anchor": "last_active_at", "days": row.expires_after_days} if row.expires_after_days is not None else None
        ),
        "expires_at": epoch(expiry) if expiry is not None else None,
        "last_active_at": epoch(row.last_active_at),
        "metadata": row.store_metadata or {},
        "embedding_model": row.embedding_model,
    }


def file_object(row: VectorStoreFileRow) -> dict[str, Any]:
    return {
        "id": row.file_id,
        "object": "vector_store.file",
        "created_at": epoch(row.created_at),
        "vector_store_id": row.vector_store_id,
        "status": row.status,
        "last_error": row.last_error,
        "usage_bytes": row.usage_bytes,
        "attributes": row.attributes or {},
        "chunking_strategy": {
            "type": "static",
            "static": {
                "max_chunk_size_tokens": row.max_chunk_size_tokens,
                "chunk_overlap_tokens": row.chunk_overlap_tokens,
            },
        },
    }


def batch_object(row: VectorStoreFileBatchRow, files: list[VectorStoreFileRow]) -> dict[str, Any]:
    counts = file_counts(f.status for f in files)
    if row.cancelled:
        status = "cancelled"
    elif counts["in_progress"]:
        status = "in_progress"
    elif counts["failed"] and counts["failed"] == counts["total"]:
        status = "failed"
    else:
        status = "completed"
    return {
        "id": row.id,
        "object": "vector_store.files_batch",
        "created_at": epoch(row.created_at),
        "vector_store_id": row.vector_store_id,
        "status": status,
        "file_counts": counts,
    }


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def paginate(
    items: list[dict[str, Any]], *, limit: int, order: str, after: str | None, before: str | None
) -> dict[str, Any]:
    """OpenAI's cursor pages over objects sorted by creation (then id)."""
    items = sorted(items, key=lambda o: (o["created_at"], o["id"]), reverse=order == "desc")
    ids = [o["id"] for o in items]
    if after is not None:
        items = items[ids.index(after) + 1 :] if after in ids else []
        ids = [o["id"] for o in items]
    if before is not None:
        items = items[: ids.index(before)] if before in ids else []
    return page(items[:limit], len(items) > limit)
