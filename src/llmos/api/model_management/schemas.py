"""Bodies of the model-management endpoints (pull, describe, load)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Tag = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")]


class PullCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=1024, description="Catalog name or source URI (pypi:, file:, hf:).")
    name: str | None = Field(default=None, max_length=256, description="Register under this name.")
    description: str | None = Field(default=None, max_length=2000)
    tags: list[Tag] | None = Field(default=None, max_length=32)


class ModelUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str | None = Field(default=None, max_length=2000)
    tags: list[Tag] | None = Field(default=None, max_length=32)


class ModelLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pin: bool = Field(default=True, description="Keep it resident until unloaded (not evicted when idle).")


class ExportCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: str = Field(
        min_length=1, max_length=32, description="An export format: GET /v1/model_export_formats lists them."
    )
