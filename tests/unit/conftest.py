"""In-process HTTP clients for the unit tests: the app on the tiny models, driven through
FastAPI's TestClient and through the official ``openai`` package."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.kernel.supervisor import JobSupervisor
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY


@pytest.fixture
def http(loaded_platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform=loaded_platform)) as client:
        yield client


@pytest.fixture
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=http, max_retries=0)


@pytest.fixture
def quiet_http(loaded_platform: Platform) -> Iterator[TestClient]:
    """The app without its job supervisor: a test starts jobs by ticking ``supervisor`` itself."""
    settings = loaded_platform.settings.model_copy(update={"max_concurrent_jobs": 0})
    with TestClient(create_app(platform=dataclasses.replace(loaded_platform, settings=settings))) as client:
        yield client


@pytest.fixture
def quiet_client(quiet_http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=quiet_http, max_retries=0)


@pytest.fixture
def supervisor(loaded_platform: Platform) -> Iterator[JobSupervisor]:
    """A job supervisor with real workers, driven only by the test's ``tick()`` calls."""
    p = loaded_platform
    supervisor = JobSupervisor(p.jobs, p.training_quota, p.settings.model_copy(update={"max_concurrent_jobs": 1}))
    yield supervisor
    supervisor.stop()
