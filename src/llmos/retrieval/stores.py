"""Vector stores of a tenant: the stores, their attached files and file batches, in the database;
each store's indexes on disk. Another tenant's ids do not exist for a caller (404)."""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from llmos.errors import InvalidRequestError, NotFoundError
from llmos.registry.db import Database
from llmos.registry.vector_tables import VectorChunkRow, VectorStoreFileBatchRow, VectorStoreFileRow, VectorStoreRow
from llmos.retrieval import records
from llmos.retrieval.chunking import StaticChunking
from llmos.retrieval.filters import Attributes
from llmos.retrieval.index import StoreIndexes, as_matrix, rebuilt

_STORE_ID = re.compile(r"^vs_[0-9a-f]{24}$")
ACTIVITY_RESOLUTION = timedelta(minutes=1)


class VectorStores:
    def __init__(self, db: Database, directory: Path) -> None:
        self.db = db
        self.directory = directory
        self._indexes: dict[str, StoreIndexes] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    # -- stores

    def create(
        self,
        tenant: str,
        *,
        name: str,
        description: str | None,
        embedding_model: str,
        metadata: dict[str, str] | None,
        expires_after_days: int | None,
    ) -> VectorStoreRow:
        now = datetime.now(UTC)
        row = VectorStoreRow(
            id=f"vs_{uuid.uuid4().hex[:24]}",
            tenant=tenant,
            name=name,
            description=description,
            embedding_model=embedding_model,
            store_metadata=metadata,
            expires_after_days=expires_after_days,
            last_active_at=now,
            created_at=now,
        )
        with self.db.session() as s:
            s.add(row)
        return row

    def get(self, tenant: str, store_id: str) -> VectorStoreRow:
        with self.db.session() as s:
            return self._store(s, tenant, store_id)

    def usable(self, tenant: str, store_id: str) -> VectorStoreRow:
        """The store, refused with 400 once it has expired (its data is kept until it is deleted)."""
        row = self.get(tenant, store_id)
        if records.is_expired(row):
            raise InvalidRequestError(f"vector store {store_id} has expired", param="vector_store_id", code="expired")
        return row

    def public(self, tenant: str, store_id: str) -> dict[str, Any]:
        with self.db.session() as s:
            row = self._store(s, tenant, store_id)
            return records.store_object(row, self._files(s, store_id))

    def listing(self, tenant: str) -> list[dict[str, Any]]:
        with self.db.session() as s:
            rows = s.scalars(select(VectorStoreRow).where(VectorStoreRow.tenant == tenant)).all()
            return [records.store_object(r, self._files(s, r.id)) for r in rows]

    def update(self, tenant: str, store_id: str, changes: dict[str, Any]) -> None:
        with self.db.session() as s:
            row = self._store(s, tenant, store_id)
            for field, value in changes.items():
                setattr(row, field, value)
            row.last_active_at = datetime.now(UTC)  # OpenAI's anchor: a change keeps the store alive

    def delete(self, tenant: str, store_id: str) -> None:
        with self.db.session() as s:
            self._store(s, tenant, store_id)
            for table in (VectorChunkRow, VectorStoreFileRow, VectorStoreFileBatchRow):
                s.execute(delete(table).where(table.vector_store_id == store_id))
            s.execute(delete(VectorStoreRow).where(VectorStoreRow.id == store_id))
        with self._lock(store_id):
            indexes = self._indexes.pop(store_id, None)
            if indexes is None:
                indexes = StoreIndexes(self.directory / store_id)
            indexes.destroy()

    def touch(self, row: VectorStoreRow) -> None:
        """Mark the store active (a search); written at most once a minute, so that concurrent
        searches do not queue for the database's write lock over a figure kept in days."""
        now = datetime.now(UTC)
        last = row.last_active_at if row.last_active_at.tzinfo else row.last_active_at.replace(tzinfo=UTC)
        if now - last < ACTIVITY_RESOLUTION:
            return
        with self.db.session() as s:
            s.execute(update(VectorStoreRow).where(VectorStoreRow.id == row.id).values(last_active_at=now))

    # -- files

    def attach(
        self,
        tenant: str,
        store_id: str,
        files: Iterable[tuple[str, str, Attributes | None, StaticChunking]],
        batch_id: str | None = None,
    ) -> list[VectorStoreFileRow]:
        """Attach (file id, filename, attributes, chunking) in_progress; a file already attached
        is attached again from scratch (its chunks dropped)."""
        rows = []
        now = datetime.now(UTC)
        with self.db.session() as s:
            self._store(s, tenant, store_id)
            if batch_id is not None:
                s.add(VectorStoreFileBatchRow(id=batch_id, vector_store_id=store_id, tenant=tenant, created_at=now))
            for file_id, filename, attributes, chunking in files:
                s.execute(
                    delete(VectorStoreFileRow).where(
                        VectorStoreFileRow.vector_store_id == store_id, VectorStoreFileRow.file_id == file_id
                    )
                )
                rows.append(
                    VectorStoreFileRow(
                        vector_store_id=store_id,
                        file_id=file_id,
                        tenant=tenant,
                        filename=filename,
                        status="in_progress",
                        attributes=attributes,
                        max_chunk_size_tokens=chunking.max_chunk_size_tokens,
                        chunk_overlap_tokens=chunking.chunk_overlap_tokens,
                        usage_bytes=0,
                        batch_id=batch_id,
                        created_at=now,
                    )
                )
            s.add_all(rows)
        for file_id in {r.file_id for r in rows}:
            self._drop_chunks(store_id, file_id)
        return rows

    def file(self, tenant: str, store_id: str, file_id: str) -> VectorStoreFileRow:
        with self.db.session() as s:
            self._store(s, tenant, store_id)
            row = s.get(VectorStoreFileRow, (store_id, file_id))
            if row is None:
                raise NotFoundError(f"No such vector store file: {file_id[:80]}", param="file_id")
            return row

    def files(self, tenant: str, store_id: str, batch_id: str | None = None) -> list[VectorStoreFileRow]:
        with self.db.session() as s:
            self._store(s, tenant, store_id)
            rows = self._files(s, store_id)
        return [r for r in rows if batch_id is None or r.batch_id == batch_id]

    def set_attributes(self, tenant: str, store_id: str, file_id: str, attributes: Attributes | None) -> None:
        self.file(tenant, store_id, file_id)
        with self.db.session() as s:
            s.execute(
                update(VectorStoreFileRow)
                .where(VectorStoreFileRow.vector_store_id == store_id, VectorStoreFileRow.file_id == file_id)
                .values(attributes=attributes)
            )

    def detach(self, tenant: str, store_id: str, file_id: str) -> None:
        """Remove the file from the store with its chunks (the uploaded file itself stays)."""
        self.file(tenant, store_id, file_id)
        with self.db.session() as s:
            s.execute(
                delete(VectorStoreFileRow).where(
                    VectorStoreFileRow.vector_store_id == store_id, VectorStoreFileRow.file_id == file_id
                )
            )
        self._drop_chunks(store_id, file_id)

    def forget_file(self, tenant: str, file_id: str) -> None:
        """A deleted upload leaves every store of its tenant, chunks and all."""
        with self.db.session() as s:
            stores = s.scalars(
                select(VectorStoreFileRow.vector_store_id).where(
                    VectorStoreFileRow.tenant == tenant, VectorStoreFileRow.file_id == file_id
                )
            ).all()
        for store_id in stores:
            self.detach(tenant, store_id, file_id)

    def batch(self, tenant: str, store_id: str, batch_id: str) -> dict[str, Any]:
        with self.db.session() as s:
            self._store(s, tenant, store_id)
            row = s.get(VectorStoreFileBatchRow, batch_id)
            if row is None or row.vector_store_id != store_id:
                raise NotFoundError(f"No such vector store file batch: {batch_id[:80]}", param="batch_id")
            files = [f for f in self._files(s, store_id) if f.batch_id == batch_id]
            return records.batch_object(row, files)

    def cancel_batch(self, tenant: str, store_id: str, batch_id: str) -> None:
        """Files of the batch not yet processed are cancelled (processing discards their chunks)."""
        self.batch(tenant, store_id, batch_id)
        with self.db.session() as s:
            s.execute(
                update(VectorStoreFileBatchRow).where(VectorStoreFileBatchRow.id == batch_id).values(cancelled=True)
            )
            s.execute(
                update(VectorStoreFileRow)
                .where(VectorStoreFileRow.batch_id == batch_id, VectorStoreFileRow.status == "in_progress")
                .values(status="cancelled")
            )

    # -- processing results

    def fail(self, store_id: str, file_id: str, code: str, message: str) -> None:
        with self.db.session() as s:
            s.execute(
                update(VectorStoreFileRow)
                .where(
                    VectorStoreFileRow.vector_store_id == store_id,
                    VectorStoreFileRow.file_id == file_id,
                    VectorStoreFileRow.status == "in_progress",
                )
                .values(status="failed", last_error={"code": code, "message": message[:1024]})
            )

    def complete(self, store_id: str, file_id: str, chunks: list[str], embeddings: list[list[float]]) -> bool:
        """Store a processed file's chunks and index them, all or nothing; False (and nothing
        stored) when the file was detached or cancelled meanwhile."""
        matrix = as_matrix(embeddings)
        blobs = [row.astype("<f4").tobytes() for row in matrix]
        usage = sum(len(c.encode()) for c in chunks) + sum(len(b) for b in blobs)
        with self._lock(store_id):
            indexes = self._open(store_id)  # in step with the database before the new chunks are added to both
            with self.db.session() as s:
                done = s.execute(
                    update(VectorStoreFileRow)
                    .where(
                        VectorStoreFileRow.vector_store_id == store_id,
                        VectorStoreFileRow.file_id == file_id,
                        VectorStoreFileRow.status == "in_progress",
                    )
                    .values(status="completed", usage_bytes=usage)
                )
                if done.rowcount != 1:  # type: ignore[attr-defined]
                    return False
                rows = [
                    VectorChunkRow(vector_store_id=store_id, file_id=file_id, position=i, text=text, embedding=blob)
                    for i, (text, blob) in enumerate(zip(chunks, blobs, strict=True))
                ]
                s.add_all(rows)
                s.flush()
                keys = [r.id for r in rows]
            indexes.add(keys, chunks, matrix)
        return True

    # -- indexes

    def nearest(
        self, store_id: str, vector: np.ndarray | None, count: int, text: str | None, text_count: int
    ) -> tuple[list[tuple[int, float]], list[int]]:
        """The chunks nearest ``vector`` (with their cosine similarity) and those best matching
        ``text`` by BM25, each skipped when None. Under the store's lock: an index is never read
        while a write changes it."""
        with self._lock(store_id):
            indexes = self._open(store_id)
            similar = indexes.vectors.search(vector, count) if vector is not None else []
            keywords = indexes.keywords.search(text, text_count) if text is not None else []
        return similar, keywords

    def chunks(self, ids: Iterable[int]) -> dict[int, VectorChunkRow]:
        with self.db.session() as s:
            rows = s.scalars(select(VectorChunkRow).where(VectorChunkRow.id.in_(list(ids)))).all()
            return {r.id: r for r in rows}

    def file_chunks(self, store_id: str, file_id: str) -> list[str]:
        with self.db.session() as s:
            return list(
                s.scalars(
                    select(VectorChunkRow.text)
                    .where(VectorChunkRow.vector_store_id == store_id, VectorChunkRow.file_id == file_id)
                    .order_by(VectorChunkRow.position)
                )
            )

    def unfinished(self) -> list[tuple[VectorStoreFileRow, str]]:
        """Files left in_progress by a stopped server, with their store's embedding model."""
        with self.db.session() as s:
            rows = s.execute(
                select(VectorStoreFileRow, VectorStoreRow.embedding_model)
                .join(VectorStoreRow, VectorStoreRow.id == VectorStoreFileRow.vector_store_id)
                .where(VectorStoreFileRow.status == "in_progress")
            ).all()
        return [(r[0], r[1]) for r in rows]

    def files_of(self, store_id: str) -> list[VectorStoreFileRow]:
        with self.db.session() as s:
            return self._files(s, store_id)

    def embeddings(self, store_id: str, file_ids: list[str]) -> dict[int, bytes]:
        with self.db.session() as s:
            rows = s.execute(
                select(VectorChunkRow.id, VectorChunkRow.embedding).where(
                    VectorChunkRow.vector_store_id == store_id, VectorChunkRow.file_id.in_(file_ids)
                )
            ).all()
        return {r[0]: r[1] for r in rows}

    def chunk_count(self, store_id: str) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).where(VectorChunkRow.vector_store_id == store_id)) or 0)

    def _open(self, store_id: str) -> StoreIndexes:
        """The store's indexes (the caller holds its lock), rebuilt from the database when a file
        is missing, unreadable or holds another number of chunks than the database."""
        directory = self.directory / store_id
        cached = self._indexes.get(store_id)
        if cached is not None and cached.intact():
            return cached
        if cached is not None:
            cached.close()
        indexes = StoreIndexes(directory)
        if not indexes.in_step(self.chunk_count(store_id)):
            indexes.close()
            with self.db.session() as s:
                rows = s.execute(
                    select(VectorChunkRow.id, VectorChunkRow.text, VectorChunkRow.embedding).where(
                        VectorChunkRow.vector_store_id == store_id
                    )
                ).all()
            indexes = rebuilt(directory, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        self._indexes[store_id] = indexes
        return indexes

    def _drop_chunks(self, store_id: str, file_id: str) -> None:
        with self._lock(store_id):
            indexes = self._open(store_id)
            with self.db.session() as s:
                keys = list(
                    s.scalars(
                        select(VectorChunkRow.id).where(
                            VectorChunkRow.vector_store_id == store_id, VectorChunkRow.file_id == file_id
                        )
                    )
                )
                s.execute(delete(VectorChunkRow).where(VectorChunkRow.id.in_(keys)))
            if keys:
                indexes.remove(keys)

    def _lock(self, store_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(store_id, threading.Lock())

    @staticmethod
    def _store(s: Session, tenant: str, store_id: str) -> VectorStoreRow:
        row = s.get(VectorStoreRow, store_id) if _STORE_ID.fullmatch(store_id) else None
        if row is None or row.tenant != tenant:  # another tenant's store does not exist for the caller
            raise NotFoundError(f"No such vector store: {store_id[:80]}", param="vector_store_id")
        return row

    @staticmethod
    def _files(s: Session, store_id: str) -> list[VectorStoreFileRow]:
        return list(s.scalars(select(VectorStoreFileRow).where(VectorStoreFileRow.vector_store_id == store_id)))

    def close(self) -> None:
        for indexes in self._indexes.values():
            indexes.close()
        self._indexes.clear()
