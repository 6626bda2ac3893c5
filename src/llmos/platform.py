"""Wires the layers together: one object the API and CLI hold (settings, database, registry, engine)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmos.config import Settings
from llmos.registry import LocalArtifactStore, ModelRegistry
from llmos.registry.db import Database
from llmos.security import KeyStore

if TYPE_CHECKING:
    from llmos.engine.protocol import EngineClient


@dataclass
class Platform:
    settings: Settings
    db: Database
    registry: ModelRegistry
    keys: KeyStore

    @classmethod
    def open(cls, settings: Settings) -> Platform:
        settings.home.mkdir(parents=True, exist_ok=True)
        db = Database(settings.db_url)
        registry = ModelRegistry(db, LocalArtifactStore(settings.store_dir), settings.home)
        return cls(settings=settings, db=db, registry=registry, keys=KeyStore(db))

    def make_engine(self) -> EngineClient:
        from llmos.engine.local import LocalEngine

        return LocalEngine(self.registry, self.settings)

    def close(self) -> None:
        self.db.dispose()
