"""Database engine, sessions and schema migrations (Alembic, run at start-up)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from llmos.errors import InvalidRequestError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


MAX_DB_INT = 2**63 - 1  # the widest integer a column holds (SQLite INTEGER, PostgreSQL BIGINT)


def parse_db_int(text: str, *, param: str) -> int:
    """``text`` as an integer a query may compare with a column: ASCII digits, at most ``MAX_DB_INT``
    (a larger one makes the database driver raise, which would answer 500); else 400."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > MAX_DB_INT:
        raise InvalidRequestError(f"'{text[:40]}' is not an integer from 0 to {MAX_DB_INT}", param=param)
    return int(text)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # Foreign keys are off by default in SQLite; both settings belong to the connection.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _use_wal(engine: Engine) -> None:
    """Put the file in WAL mode (kept in the file), so the API reads while a writer commits. Done
    once, on one connection, before any other: connections that switch a file's mode at the same
    time fail with "database is locked" whatever their busy timeout."""
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        _use_wal(engine)
        return engine
    return create_engine(url, pool_pre_ping=True)


def migrate(url: str) -> None:
    """Bring the schema at ``url`` to the newest revision."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, "head")


class Database:
    """Owns the engine and hands out short transactional sessions."""

    def __init__(self, url: str, *, run_migrations: bool = True) -> None:
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        if run_migrations:
            migrate(url)
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on any exception."""
        with self._sessions() as session, session.begin():
            yield session

    @contextmanager
    def advisory_lock(self, name: str, *, shared: bool) -> Iterator[None]:
        """Hold the lock ``name`` for every process on this database until the block ends: many
        holders at once when ``shared``, else one alone. On PostgreSQL an advisory lock of a
        transaction on a connection of its own (a crashed holder's lock goes with its connection).
        SQLite is one machine's file, whose callers already hold that machine's lock: nothing to do."""
        if self.engine.dialect.name != "postgresql":
            yield
            return
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        take = "pg_advisory_xact_lock_shared" if shared else "pg_advisory_xact_lock"
        with self.engine.connect() as conn, conn.begin():
            conn.execute(text(f"SELECT {take}(:key)"), {"key": key})
            yield

    def dispose(self) -> None:
        self.engine.dispose()
