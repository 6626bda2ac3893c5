"""Model objects: OpenAI's four fields plus the registry's (task, version, parent, size, ...)."""

from __future__ import annotations

from datetime import UTC
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel

from llmos.registry import ModelRecord


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # Extra fields beyond OpenAI's; the openai client keeps them as attributes.
    task: str
    version: int
    parent: str | None
    root: str
    format: str
    family: str | None
    architecture: str | None
    parameter_count: int | None
    size_bytes: int
    context_length: int | None
    license: str | None
    source: str
    status: str
    description: str | None = None
    tags: list[str] = []
    aliases: list[str] = []
    """``name@alias`` references that name this version."""
    artifacts: dict[str, str] | None = None
    extra: dict[str, Any] | None = None
    exports: list[dict[str, Any]] | None = None
    """Retrieve only: this version's verified exports kept as the caller's tenant's files."""

    @classmethod
    def from_record(
        cls,
        r: ModelRecord,
        *,
        parent_name: str | None = None,
        detail: bool = False,
        server_paths: bool = False,
        aliases: list[str] | None = None,
        exports: list[dict[str, Any]] | None = None,
    ) -> ModelObject:
        """``server_paths``: show ``file:`` sources whole (admins); tenants see only the last name."""
        created = r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=UTC)
        return cls(
            id=r.name,
            created=int(created.timestamp()),
            owned_by=r.owner,
            task=r.task,
            version=r.version,
            parent=parent_name,
            root=f"{r.name}@{r.version}",
            format=r.format,
            family=r.family,
            architecture=r.architecture,
            parameter_count=r.parameter_count,
            size_bytes=r.size_bytes,
            context_length=r.context_length,
            license=r.license,
            source=r.source if server_paths else tenant_source(r.source),
            status=r.status,
            description=r.description,
            tags=list(r.tags),
            aliases=aliases or [],
            artifacts=r.artifacts if detail else None,
            extra=r.extra if detail else None,
            exports=exports,
        )


def tenant_source(source: str) -> str:
    """A ``file:`` source without the server's directories (``file:/srv/x/model.gguf`` -> ``file:model.gguf``)."""
    scheme, _, spec = source.partition(":")
    return f"file:{PurePosixPath(spec).name}" if scheme == "file" else source


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool
