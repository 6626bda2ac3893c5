"""Blob garbage collection: a blob goes when no model artifact and no file refers to it."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import select

from llmos.registry.db import Database
from llmos.registry.store import ArtifactStore
from llmos.registry.tables import ArtifactRow, FileRow


def collect_unreferenced(db: Database, store: ArtifactStore, digests: Iterable[str]) -> None:
    candidates = set(digests)
    if not candidates:
        return
    with db.session() as s:
        used = set(s.scalars(select(ArtifactRow.sha256).where(ArtifactRow.sha256.in_(candidates))).all())
        used |= set(s.scalars(select(FileRow.sha256).where(FileRow.sha256.in_(candidates))).all())
    for digest in candidates - used:
        store.delete(digest)
