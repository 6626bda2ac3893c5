"""Blob garbage collection. A blob's references are the model artifacts, files and job checkpoints
naming its digest, and the claims of writes in progress (``claiming``), counted in the database; a
blob goes when the count is zero. A blob is placed with its reference
under the store's ``placing`` lock and judged unreferenced and deleted under its ``collecting`` lock,
which exclude each other on every machine sharing the blobs (a database advisory lock where servers
share PostgreSQL), so a tenant deleting its copy never removes a blob another tenant's upload, on
this server or another, is about to refer to, and two servers never collect at once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select

from llmos.registry.db import Database
from llmos.registry.store import ArtifactStore
from llmos.registry.tables import ArtifactRow, BlobClaimRow, FileRow, JobCheckpointFileRow

_QUERY_BATCH = 500  # digests per IN (...) query
BLOB_LOCK = "llmos.artifact-store"
"""The database lock that ``ArtifactStore.placing`` and ``collecting`` take across servers."""


@dataclass(frozen=True)
class Collected:
    blobs: int
    staged_files: int


def referenced(db: Database, digests: Iterable[str]) -> set[str]:
    """Those of ``digests`` that a model artifact, a file, a job checkpoint or a write in progress refers to."""
    pending = list(set(digests))
    used: set[str] = set()
    with db.session() as s:
        for start in range(0, len(pending), _QUERY_BATCH):
            batch = pending[start : start + _QUERY_BATCH]
            for column in (ArtifactRow.sha256, FileRow.sha256, JobCheckpointFileRow.sha256, BlobClaimRow.sha256):
                used.update(s.scalars(select(column).where(column.in_(batch))))
    return used


@contextmanager
def claiming(db: Database, store: ArtifactStore, digests: Iterable[str]) -> Iterator[None]:
    """Count ``digests`` as referenced while the block runs: for a write that stores blobs (or finds
    them stored) before it writes the rows that refer to them, so that no collection, on any server,
    takes one in between. Claimed under ``placing``, so a collection deciding meanwhile has finished
    (what it took is then missing, and stored again by the write) or starts after and keeps them."""
    claim = uuid.uuid4().hex
    rows = [BlobClaimRow(claim=claim, sha256=digest, created_at=datetime.now(UTC)) for digest in set(digests)]
    with store.placing(), db.session() as s:
        s.add_all(rows)
    try:
        yield
    finally:
        with db.session() as s:
            s.execute(delete(BlobClaimRow).where(BlobClaimRow.claim == claim))


def collect_unreferenced(db: Database, store: ArtifactStore, digests: Iterable[str]) -> None:
    """Delete those of ``digests`` nothing refers to any more (right after their last reference went)."""
    candidates = set(digests)
    if not candidates:
        return
    with store.collecting():
        for digest in candidates - referenced(db, candidates):
            store.delete(digest)


def collect_garbage(db: Database, store: ArtifactStore, *, grace_s: float, now: float | None = None) -> Collected:
    """The periodic sweep: remove every unreferenced blob last placed or claimed more than
    ``grace_s`` ago, and temporary files of writes abandoned that long ago. The grace period covers
    writers that place blobs before writing their references (a model pull stores every file, then
    its rows), and whatever a crash left behind is found here."""
    cutoff = (time.time() if now is None else now) - grace_s
    with db.session() as s:  # claims of writes that crashed
        s.execute(delete(BlobClaimRow).where(BlobClaimRow.created_at < datetime.fromtimestamp(cutoff, UTC)))
    old = {digest for digest, claimed in store.blobs() if claimed < cutoff}
    removed = 0
    if old:
        with store.collecting():
            unreferenced = old - referenced(db, old)
            # Re-read the times under the lock: a writer may have claimed one since.
            for digest, claimed in store.blobs():
                if digest in unreferenced and claimed < cutoff:
                    store.delete(digest)
                    removed += 1
    stale = [path for path, modified in store.staged_files() if modified < cutoff]
    for path in stale:
        path.unlink(missing_ok=True)
    return Collected(blobs=removed, staged_files=len(stale))
