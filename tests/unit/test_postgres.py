"""The registry and API keys on a real PostgreSQL server (migrations included)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos.config import Settings
from llmos.platform import Platform
from tests.postgres import postgres_server


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


def test_registry_and_keys_on_postgres(pg_url: str, tmp_path: Path, tiny_chat_dir: Path) -> None:
    platform = Platform.open(Settings(home=tmp_path / "home", database_url=pg_url))
    try:
        record = platform.registry.pull(f"file:{tiny_chat_dir}", name="tiny")
        assert platform.registry.get("tiny").id == record.id
        assert platform.registry.get("tiny@1").artifacts == record.artifacts
        assert record.created_at.tzinfo is not None
        info, key = platform.keys.create("pg", scopes=("inference",))
        assert platform.keys.verify(key).id == info.id
        platform.registry.delete("tiny")
        assert platform.registry.list() == []
    finally:
        platform.close()


def test_migrations_are_idempotent_on_postgres(pg_url: str, tmp_path: Path) -> None:
    for _ in range(2):
        Platform.open(Settings(home=tmp_path / "home", database_url=pg_url)).close()
