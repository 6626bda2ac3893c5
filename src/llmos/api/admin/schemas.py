"""Admin request bodies: unknown fields are refused (no mass assignment of owners or paths)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class AdminModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class TenantCreate(AdminModel):
    id: Annotated[str, Field(min_length=1, max_length=63)]
    name: Annotated[str, Field(max_length=256)] | None = None
    limits: dict[str, Any] | None = None


class TenantUpdate(AdminModel):
    name: Annotated[str, Field(max_length=256)] | None = None
    limits: dict[str, Any] | None = None
    disabled: bool | None = None


class KeyCreate(AdminModel):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    tenant: Annotated[str, Field(min_length=1, max_length=63)] = "default"
    scopes: Annotated[list[str], Field(min_length=1, max_length=4)] = ["inference"]
    expires_at: Annotated[int, Field(gt=0, le=4_102_444_800)] | None = None  # at most year 2100
    """Unix seconds."""
    limits: dict[str, Any] | None = None
