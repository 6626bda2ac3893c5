"""Uploaded files: tenant-owned, content-addressed, validated at upload, created idempotently."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete as sa_delete
from sqlalchemy import func, select

from llmos.errors import InvalidRequestError, NotFoundError, PayloadTooLargeError, PermissionDeniedError
from llmos.registry.db import Database
from llmos.registry.gc import collect_unreferenced
from llmos.registry.idempotency import find_earlier, insert_once
from llmos.registry.store import ArtifactStore
from llmos.registry.tables import FileRow, ModelRow

Validator = Callable[[Path], dict[str, Any]]
"""Checks an uploaded file for one purpose; returns what it found or raises InvalidRequestError."""

GENERATED_PURPOSES = frozenset({"fine-tune-results", "batch_output", "model-export"})
"""Purposes of files the platform writes for a tenant; never accepted as uploads."""
_FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
_UNSAFE_NAME = re.compile(r"[\x00-\x1f/\\]")


@dataclass(frozen=True)
class FileRecord:
    id: str
    tenant: str
    purpose: str
    filename: str
    bytes: int
    sha256: str
    status: str
    status_details: str | None
    created_at: datetime
    summary: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: FileRow) -> FileRecord:
        created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
        return cls(
            id=row.id,
            tenant=row.tenant,
            purpose=row.purpose,
            filename=row.filename,
            bytes=row.bytes,
            sha256=row.sha256,
            status=row.status,
            status_details=row.status_details,
            created_at=created,
            summary=dict(row.summary or {}),
        )

    def public(self) -> dict[str, Any]:
        """OpenAI's file object, plus the content hash and what validation found."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": int(self.created_at.timestamp()),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": self.status,
            "status_details": self.status_details,
            "expires_at": None,
            "sha256": self.sha256,
            **self.summary,
        }


def clean_filename(name: str | None) -> str:
    """The last path component, without control characters, at most 255 characters."""
    base = re.split(r"[/\\]", name or "")[-1]
    base = _UNSAFE_NAME.sub("_", base).strip() or "upload"
    return base[-255:]


def _limited(chunks: Iterable[bytes], max_bytes: int) -> Iterator[bytes]:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLargeError(f"file exceeds the upload limit of {max_bytes} bytes", param="file")
        yield chunk


StorageQuota = Callable[[str], int | None]
"""The bytes of files and models a tenant may keep (None: unlimited)."""


def storage_used(db: Database, tenant: str) -> int:
    """Bytes a tenant keeps: its files and its models, each counted whole even when its content is
    shared with another tenant (so nothing about others' content shows in a tenant's figures)."""
    with db.session() as s:
        files = s.scalar(select(func.coalesce(func.sum(FileRow.bytes), 0)).where(FileRow.tenant == tenant))
        models = s.scalar(select(func.coalesce(func.sum(ModelRow.size_bytes), 0)).where(ModelRow.owner == tenant))
    return int(files or 0) + int(models or 0)


class FileStore:
    """``validators`` maps each accepted purpose to its check (injected: the training layer knows
    the formats it can learn from; the file system does not); ``quota`` gives each tenant's storage
    allowance (injected: tenants and their limits belong to the security layer)."""

    def __init__(
        self,
        db: Database,
        store: ArtifactStore,
        validators: dict[str, Validator],
        quota: StorageQuota = lambda tenant: None,
    ) -> None:
        self.db = db
        self.store = store
        self.validators = validators
        self.quota = quota

    def create(
        self,
        *,
        tenant: str,
        purpose: str,
        filename: str | None,
        chunks: Iterable[bytes],
        max_bytes: int,
        idempotency_key: str | None = None,
        generated: bool = False,
        lineage: dict[str, Any] | None = None,
    ) -> tuple[FileRecord, bool]:
        """Store and validate an upload. Returns the file and whether it was created (False: the
        idempotency key named an identical earlier upload). ``lineage`` (a file the platform built:
        where its lines came from) is kept in its summary.

        The bytes are written to a private staging file while hashed, validated there line by line,
        and only then placed under their digest together with the file's row; whatever fails on the
        way (a conflict, the quota, a validator's crash) leaves no blob behind."""
        if purpose not in self.validators and not (generated and purpose in GENERATED_PURPOSES):
            raise InvalidRequestError(f"purpose must be one of {sorted(self.validators)}", param="purpose")
        if idempotency_key is not None and not (0 < len(idempotency_key) <= 255):
            raise InvalidRequestError("Idempotency-Key must be 1 to 255 characters", param="Idempotency-Key")
        name = clean_filename(filename)
        staged = self.store.stage(_limited(chunks, max_bytes))
        try:
            request_hash = hashlib.sha256(f"{purpose}\0{name}\0{staged.digest}".encode()).hexdigest()
            if idempotency_key is not None:
                earlier = self._by_key(tenant, idempotency_key, request_hash)
                if earlier is not None:
                    return earlier, False
            self._check_quota(tenant, staged.size)
            # What the platform writes itself (``generated``: a job's results) needs no validation.
            status, details, summary = ("processed", None, {}) if generated else self._validate(purpose, staged.path)
            if lineage is not None:
                summary = {**summary, "lineage": lineage}
            row = FileRow(
                id=f"file-{uuid.uuid4().hex[:24]}",
                tenant=tenant,
                purpose=purpose,
                filename=name,
                bytes=staged.size,
                sha256=staged.digest,
                status=status,
                status_details=details,
                summary=summary,
                created_at=datetime.now(UTC),
                idempotency_key=idempotency_key,
                request_hash=request_hash,
            )
            with self.store.placing():
                self._check_quota(tenant, staged.size)  # again, now that no other upload can add to it
                new_blob = self.store.place(staged)
                try:
                    stored, created = insert_once(self.db, row)  # a concurrent twin may have won: its file
                except BaseException:
                    if new_blob:
                        self.store.delete(staged.digest)
                    raise
            return FileRecord.from_row(stored), created
        finally:
            staged.discard()

    def _check_quota(self, tenant: str, adding: int) -> None:
        allowed = self.quota(tenant)
        if allowed is None:
            return
        used = storage_used(self.db, tenant)
        if used + adding > allowed:
            raise PermissionDeniedError(
                f"storage quota exceeded: this tenant keeps {used} bytes of files and models, this upload adds "
                f"{adding} and the quota is {allowed}. Delete files or models, or ask for a larger quota.",
                param="file",
                code="storage_quota_exceeded",
            )

    def require_room(self, tenant: str, param: str = "model") -> None:
        """403 ``storage_quota_exceeded`` when ``tenant`` has no storage left for what a job would
        write (a fine-tuned model): refused before the job is queued, not after it has trained."""
        allowed = self.quota(tenant)
        if allowed is None:
            return
        used = storage_used(self.db, tenant)
        if used >= allowed:
            raise PermissionDeniedError(
                f"storage quota exceeded: this tenant keeps {used} bytes of files and models and the quota is "
                f"{allowed}, so a fine-tuned model could not be stored. Delete files or models, or ask for a "
                "larger quota.",
                param=param,
                code="storage_quota_exceeded",
            )

    def _by_key(self, tenant: str, key: str, request_hash: str) -> FileRecord | None:
        row = find_earlier(self.db, FileRow, tenant, key, request_hash)
        return FileRecord.from_row(row) if row is not None else None

    def _validate(self, purpose: str, path: Path) -> tuple[str, str | None, dict[str, Any]]:
        try:
            return "processed", None, self.validators[purpose](path)
        except InvalidRequestError as exc:  # recorded on the file: a job using it is refused with this message
            return "error", exc.message[:2048], {}

    def get(self, tenant: str, file_id: str) -> FileRecord:
        if not _FILE_ID.fullmatch(file_id):
            raise NotFoundError(f"No such File object: {file_id[:80]}", param="file_id")
        with self.db.session() as s:
            row = s.get(FileRow, file_id)
            if row is None or row.tenant != tenant:  # another tenant's file does not exist for you
                raise NotFoundError(f"No such File object: {file_id}", param="file_id")
            return FileRecord.from_row(row)

    def list(
        self,
        tenant: str,
        *,
        purpose: str | None = None,
        limit: int = 10000,
        after: str | None = None,
        order: str = "desc",
    ) -> tuple[list[FileRecord], bool]:
        with self.db.session() as s:
            q = select(FileRow).where(FileRow.tenant == tenant)
            if purpose is not None:
                q = q.where(FileRow.purpose == purpose)
            rows = list(s.scalars(q))
        rows.sort(key=lambda r: (r.created_at, r.id), reverse=order == "desc")
        if after is not None:
            ids = [r.id for r in rows]
            rows = rows[ids.index(after) + 1 :] if after in ids else []
        return [FileRecord.from_row(r) for r in rows[:limit]], len(rows) > limit

    def content_path(self, tenant: str, file_id: str) -> Path:
        return self.store.local_path(self.get(tenant, file_id).sha256)

    def delete(self, tenant: str, file_id: str) -> FileRecord:
        record = self.get(tenant, file_id)
        with self.db.session() as s:
            # One conditional DELETE decides: of concurrent deletes exactly one removes the row, the
            # others find nothing (404), so one audit event is written.
            gone = s.execute(sa_delete(FileRow).where(FileRow.id == file_id, FileRow.tenant == tenant))
            if gone.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFoundError(f"No such File object: {file_id}", param="file_id")
        collect_unreferenced(self.db, self.store, [record.sha256])
        return record
