"""In-process HTTP clients for the unit tests: the app on the tiny models, driven through
FastAPI's TestClient and through the official ``openai`` package."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY


@pytest.fixture
def http(loaded_platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform=loaded_platform)) as client:
        yield client


@pytest.fixture
def client(http: TestClient) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=http, max_retries=0)
