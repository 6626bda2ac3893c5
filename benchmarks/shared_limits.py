"""Admission time of the rate limiter: in memory, and in the database (SQLite, PostgreSQL).

Each admission checks a tenant and a key (the API's two subjects); the release is written by the
shared limiter's background thread and is not timed (it is off the request path).

    .venv/bin/python benchmarks/shared_limits.py [--admissions 300]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.postgres import postgres_server

from benchmarks.harness import write_result
from llmos.registry.db import Database
from llmos.security.limits import Limiter, Limits, RateLimiter
from llmos.security.shared_limits import DatabaseRateLimiter

SUBJECTS = {"tenant:bench": Limits(requests_per_minute=10**9), "key:bench": Limits(max_concurrent_requests=1000)}


def admission_ms(limiter: Limiter, admissions: int) -> float:
    spent = 0.0
    for _ in range(admissions):
        start = time.perf_counter()
        lease = limiter.admit(SUBJECTS)
        spent += time.perf_counter() - start
        lease.release(tokens=10)
    limiter.close()
    return spent / admissions * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--admissions", type=int, default=300)
    args = parser.parse_args()
    rows = {"memory": admission_ms(RateLimiter(), args.admissions * 10)}
    with tempfile.TemporaryDirectory() as tmp:
        db = Database(f"sqlite:///{tmp}/limits.db")
        rows["database: SQLite"] = admission_ms(DatabaseRateLimiter(db), args.admissions)
        db.dispose()
    with postgres_server() as url:
        db = Database(url)
        rows["database: PostgreSQL (loopback)"] = admission_ms(DatabaseRateLimiter(db), args.admissions)
        db.dispose()
    print(f"{'limits_store':<34} {'admission ms':>12}")
    for name, ms in rows.items():
        print(f"{name:<34} {ms:>12.3f}")
    write_result("shared_limits", {"admission_ms": rows, "admissions": args.admissions})


if __name__ == "__main__":
    main()
