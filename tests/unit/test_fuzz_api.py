"""Property-based fuzzing of every operation in the server's own OpenAPI schema (Schemathesis):
whatever the generated input, no 5xx and the server stays up. Each run tries a fixed set of
examples (the same every run) and a new set drawn from a random seed, printed so that a failure
can be replayed with `LLMOS_FUZZ_SEED=<seed>`. A bounded run for CI; the longer run is
`LLMOS_FUZZ_EXAMPLES=500 pytest tests/unit/test_fuzz_api.py`."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, seed, settings

from llmos.api import create_app
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY

EXAMPLES = int(os.environ.get("LLMOS_FUZZ_EXAMPLES", "15"))
SEED = int(os.environ.get("LLMOS_FUZZ_SEED") or random.SystemRandom().randrange(2**32))


@pytest.fixture
def app(loaded_platform: Platform) -> Iterator[FastAPI]:
    application = create_app(platform=loaded_platform)
    with TestClient(application):  # runs the lifespan: engine and state exist while fuzzing
        yield application


@pytest.mark.slow
@pytest.mark.parametrize("examples", ["fixed", "drawn"])
def test_no_server_errors(app: FastAPI, examples: str) -> None:
    drawn = examples == "drawn"
    replay = f" (replay: LLMOS_FUZZ_SEED={SEED})" if drawn else ""
    if drawn:
        print(f"fuzzing with seed {SEED}{replay}")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 10
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Host": "testserver"}
    for operation in operations:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=not drawn,
            database=None,  # each run is its seed's alone, replayable from the seed
        )
        @seed(SEED)
        @given(case=operation.as_strategy())
        def call(case: schemathesis.Case) -> None:
            response = case.call(headers=headers)
            where = f"{case.method} {case.formatted_path}{replay}"
            assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]}"
            content_type = response.headers.get("content-type") or [""]
            if response.status_code >= 400 and content_type[0].startswith("application/json"):
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}, where

        call()
