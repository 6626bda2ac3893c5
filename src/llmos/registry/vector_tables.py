"""Tables of vector stores (their files, chunks and file batches) and of stored responses.

Kept beside ``tables.py`` on the same declarative base (so one metadata holds every table)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from llmos.registry.tables import Base, utcnow


class VectorStoreRow(Base):
    __tablename__ = "vector_stores"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(256), default="")
    description: Mapped[str | None] = mapped_column(String(512))
    embedding_model: Mapped[str] = mapped_column(String(512))
    store_metadata: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON)
    expires_after_days: Mapped[int | None] = mapped_column(Integer)
    """Days after ``last_active_at`` at which the store expires (OpenAI's only anchor)."""
    last_active_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VectorStoreFileRow(Base):
    """A file attached to a vector store: its processing state, attributes and chunking."""

    __tablename__ = "vector_store_files"

    vector_store_id: Mapped[str] = mapped_column(ForeignKey("vector_stores.id", ondelete="CASCADE"), primary_key=True)
    file_id: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16))
    last_error: Mapped[dict[str, str] | None] = mapped_column(JSON)
    attributes: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    max_chunk_size_tokens: Mapped[int] = mapped_column(Integer)
    chunk_overlap_tokens: Mapped[int] = mapped_column(Integer)
    usage_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    batch_id: Mapped[str | None] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VectorChunkRow(Base):
    """One chunk of an attached file with its embedding: the truth the indexes are rebuilt from.
    Its id is the chunk's key in the vector index."""

    __tablename__ = "vector_chunks"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    vector_store_id: Mapped[str] = mapped_column(ForeignKey("vector_stores.id", ondelete="CASCADE"), index=True)
    file_id: Mapped[str] = mapped_column(String(64), index=True)
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    embedding: Mapped[bytes] = mapped_column(LargeBinary)
    """Little-endian float32, normalised."""


class VectorStoreFileBatchRow(Base):
    __tablename__ = "vector_store_file_batches"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    vector_store_id: Mapped[str] = mapped_column(ForeignKey("vector_stores.id", ondelete="CASCADE"), index=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    cancelled: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class StoredResponseRow(Base):
    """A response of the Responses API kept for ``previous_response_id``, GET and input_items."""

    __tablename__ = "stored_responses"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    previous_response_id: Mapped[str | None] = mapped_column(String(64))
    input_items: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    """This turn's input items (each with its id), as input_items lists them."""
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The response object answered."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class VectorItemFeedbackRow(Base):
    """A user's rating of one item (a file) of a vector store, the latest one kept: the likes and
    the items seen that recommendations read (``retrieval/item_feedback.py``)."""

    __tablename__ = "vector_item_feedback"

    vector_store_id: Mapped[str] = mapped_column(ForeignKey("vector_stores.id", ondelete="CASCADE"), primary_key=True)
    user: Mapped[str] = mapped_column(String(256), primary_key=True)
    file_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    rating: Mapped[str] = mapped_column(String(8))
    key_id: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
