"""Blob garbage collection. A blob's references are the model artifacts and files naming its digest,
counted in the database; a blob goes when the count is zero. Placing a blob with its reference and
deciding a blob is unreferenced both happen under the store's exclusive lock, so a tenant deleting
its copy never removes a blob another tenant's upload is about to refer to."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select

from llmos.registry.db import Database
from llmos.registry.store import ArtifactStore
from llmos.registry.tables import ArtifactRow, FileRow

_QUERY_BATCH = 500  # digests per IN (...) query


@dataclass(frozen=True)
class Collected:
    blobs: int
    staged_files: int


def referenced(db: Database, digests: Iterable[str]) -> set[str]:
    """Those of ``digests`` that a model artifact or a file refers to."""
    pending = list(set(digests))
    used: set[str] = set()
    with db.session() as s:
        for start in range(0, len(pending), _QUERY_BATCH):
            batch = pending[start : start + _QUERY_BATCH]
            used.update(s.scalars(select(ArtifactRow.sha256).where(ArtifactRow.sha256.in_(batch))))
            used.update(s.scalars(select(FileRow.sha256).where(FileRow.sha256.in_(batch))))
    return used


def collect_unreferenced(db: Database, store: ArtifactStore, digests: Iterable[str]) -> None:
    """Delete those of ``digests`` nothing refers to any more (right after their last reference went)."""
    candidates = set(digests)
    if not candidates:
        return
    with store.exclusive():
        for digest in candidates - referenced(db, candidates):
            store.delete(digest)


def collect_garbage(db: Database, store: ArtifactStore, *, grace_s: float, now: float | None = None) -> Collected:
    """The periodic sweep: remove every unreferenced blob last placed or claimed more than
    ``grace_s`` ago, and temporary files of writes abandoned that long ago. The grace period covers
    writers that place blobs before writing their references (a model pull stores every file, then
    its rows), and whatever a crash left behind is found here."""
    cutoff = (time.time() if now is None else now) - grace_s
    old = {digest for digest, claimed in store.blobs() if claimed < cutoff}
    removed = 0
    if old:
        with store.exclusive():
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
