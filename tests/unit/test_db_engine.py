from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from sqlalchemy import text

from llmos.registry.db import make_engine


def _fresh_file(path: Path) -> str:
    """A database file as migrations leave it: a table, the default rollback journal."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
    conn.close()
    return f"sqlite:///{path}"


def test_the_file_is_in_wal_mode_before_the_engine_hands_out_a_connection(tmp_path: Path) -> None:
    engine = make_engine(_fresh_file(tmp_path / "a.db"))
    with sqlite3.connect(tmp_path / "a.db") as outside:
        assert outside.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    outside.close()
    engine.dispose()


def test_two_engines_first_connections_at_once_all_write(tmp_path: Path) -> None:
    """Two engines on one file (two servers, or a server and a worker) open their first
    connections at the same instant, and each writes: none sees "database is locked"
    (connections switching the file's journal mode together did)."""
    for round_ in range(100):
        url = _fresh_file(tmp_path / f"{round_}.db")
        engines = [make_engine(url), make_engine(url)]
        start = threading.Barrier(8)
        errors: list[BaseException] = []

        def write(i: int) -> None:
            start.wait()
            try:
                with engines[i % 2].begin() as conn:
                    conn.execute(text("INSERT INTO t VALUES (1)"))
            except Exception as e:  # collected, asserted below
                errors.append(e)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with engines[0].connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 8
        for engine in engines:
            engine.dispose()
