"""The file system of LLM OS: models, versions, lineage, artifacts and their sources."""

from llmos.registry.catalog import CATALOG, CatalogEntry
from llmos.registry.service import ModelRecord, ModelRegistry
from llmos.registry.store import ArtifactStore, LocalArtifactStore

__all__ = ["CATALOG", "ArtifactStore", "CatalogEntry", "LocalArtifactStore", "ModelRecord", "ModelRegistry"]
