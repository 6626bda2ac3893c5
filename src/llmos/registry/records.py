"""A registered model version as the platform reads it, its lineage, and the rules for its name."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from llmos.errors import InvalidRequestError
from llmos.registry.tables import ModelRow

SHARED_OWNER = "system"  # base models: readable by every tenant, changed only by admins
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,255}$")  # ':' for ft:<base>:<tenant>:<suffix>:<id>


@dataclass(frozen=True)
class ModelRecord:
    """A registered model version, detached from the database session."""

    id: str
    name: str
    version: int
    family: str | None
    architecture: str | None
    task: str
    format: str
    parameter_count: int | None
    size_bytes: int
    context_length: int | None
    license: str | None
    source: str
    status: str
    owner: str
    parent_id: str | None
    base_id: str | None
    created_at: datetime
    extra: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    description: str | None = None
    tags: tuple[str, ...] = ()

    @classmethod
    def from_row(cls, row: ModelRow) -> ModelRecord:
        return cls(
            id=row.id,
            name=row.name,
            version=row.version,
            family=row.family,
            architecture=row.architecture,
            task=row.task,
            format=row.format,
            parameter_count=row.parameter_count,
            size_bytes=row.size_bytes,
            context_length=row.context_length,
            license=row.license,
            source=row.source,
            status=row.status,
            owner=row.owner,
            parent_id=row.parent_id,
            base_id=row.base_id,
            created_at=row.created_at,
            extra=dict(row.extra or {}),
            artifacts={a.path: a.sha256 for a in row.artifacts},
            description=row.description,
            tags=tuple(row.tags or ()),
        )


@dataclass(frozen=True)
class Lineage:
    """Who owns a new version and where it comes from (fine-tuned models name their base)."""

    owner: str = SHARED_OWNER
    parent_id: str | None = None
    base_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"invalid model name {name!r}: use letters, digits, '.', '_', ':' or '-' (at most 256)", param="name"
        )
    return name
