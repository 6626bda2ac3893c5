"""The registry and API keys on a real PostgreSQL server (migrations included)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from llmos.config import Settings
from llmos.platform import Platform
from llmos.registry.db import MIGRATIONS_DIR, make_engine
from llmos.registry.tables import Base
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


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def _schema(pg_url: str) -> tuple[list[str], dict[str, list[str]]]:
    """The revisions Alembic recorded and every table's columns, read from the server itself."""
    engine = make_engine(pg_url)
    try:
        with engine.connect() as conn:
            revisions = [row[0] for row in conn.execute(text("SELECT version_num FROM alembic_version"))]
        inspector = inspect(engine)
        columns = {
            table: sorted(c["name"] for c in inspector.get_columns(table)) for table in inspector.get_table_names()
        }
    finally:
        engine.dispose()
    return revisions, columns


def test_migrations_are_idempotent_on_postgres(pg_url: str, tmp_path: Path) -> None:
    script = ScriptDirectory.from_config(_alembic_config())
    first = Platform.open(Settings(home=tmp_path / "home", database_url=pg_url))
    try:
        _, key = first.keys.create("kept", scopes=("inference",))
    finally:
        first.close()
    revisions, columns = _schema(pg_url)
    assert revisions == [script.get_current_head()]
    assert set(Base.metadata.tables) <= set(columns)

    second = Platform.open(Settings(home=tmp_path / "home", database_url=pg_url))
    try:
        assert second.keys.verify(key).name == "kept"  # migrating again kept the rows
    finally:
        second.close()
    assert _schema(pg_url) == (revisions, columns)  # and changed nothing in the schema


def test_two_servers_share_rate_limits_on_postgres(pg_url: str) -> None:
    """Admissions racing on two connections pools (two servers) lock their subject's row: the
    limit holds exactly, however the threads interleave."""
    from concurrent.futures import ThreadPoolExecutor

    from llmos.errors import RateLimitError
    from llmos.registry.db import Database
    from llmos.security.limits import Limits
    from llmos.security.shared_limits import DatabaseRateLimiter

    databases = [Database(pg_url), Database(pg_url, run_migrations=False)]
    servers = [DatabaseRateLimiter(db) for db in databases]
    limits = {"tenant:race": Limits(requests_per_minute=12, max_concurrent_requests=50)}

    def attempt(i: int) -> bool:
        try:
            servers[i % 2].admit(limits).release(tokens=1)
        except RateLimitError:
            return False
        return True

    try:
        with ThreadPoolExecutor(12) as pool:
            assert sum(pool.map(attempt, range(60))) == 12
    finally:
        for db in databases:
            db.dispose()
