"""A tenant's standing applies on every route, not only inference: a disabled tenant's keys get
403 everywhere (route by route, over the app's own route table), and its request and
concurrency limits bind files and fine-tuning requests too."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.api.app import api_routes
from llmos.api.health import PUBLIC_PATHS
from llmos.config import Settings
from llmos.platform import Platform
from llmos.security.limits import Limits
from tests.conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROUTES = [
    (method, info.path)
    for info in api_routes(create_app(Settings()))
    if info.path not in PUBLIC_PATHS
    for method in sorted(info.methods)
]


@pytest.fixture(scope="module")
def frozen(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """An app, and a key with every scope of a tenant disabled through the admin API after the
    key was last used (so nothing is left to expire from a cache)."""
    home: Path = tmp_path_factory.mktemp("frozen") / "home"
    settings = Settings(
        home=home,
        admin_key=ADMIN_KEY,
        allowed_hosts=["testserver"],
        max_concurrent_jobs=0,
        denied_requests_per_minute=100_000,  # refusals are counted per address too: the sweep must not meet that
    )
    platform = Platform.open(settings)
    platform.tenants.create("frozen")
    _, secret = platform.keys.create("all", tenant="frozen", scopes=("inference", "files", "fine-tune", "admin"))
    key = {"Authorization": f"Bearer {secret}"}
    with TestClient(create_app(platform=platform)) as http:
        assert http.get("/v1/files", headers=key).status_code == 200
        assert http.get("/v1/admin/tenants", headers=key).status_code == 200
        assert http.patch("/v1/admin/tenants/frozen", headers=ADMIN, json={"disabled": True}).status_code == 200
        yield http, key
    platform.close()


def test_the_sweep_covers_every_kind_of_route() -> None:
    paths = {path for _, path in ROUTES}
    for prefix in (
        "/v1/files",
        "/v1/fine_tuning/jobs",
        "/v1/models",
        "/v1/admin/",
        "/v1/chat/completions",
        "/v1/usage",
    ):
        assert any(p.startswith(prefix) for p in paths), prefix


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
def test_a_disabled_tenants_key_is_refused_on_every_route(
    frozen: tuple[TestClient, dict[str, str]], method: str, path: str
) -> None:
    http, key = frozen
    resp = http.request(method, re.sub(r"\{[^}]+\}", "x", path), headers=key, json={})
    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("permission_error", "tenant_disabled")
    assert "frozen is disabled" in error["message"]


def _key(platform: Platform, tenant: str, limits: Limits) -> dict[str, str]:
    platform.tenants.create(tenant, limits=limits)
    _, secret = platform.keys.create(f"{tenant}-app", tenant=tenant, scopes=("inference", "files", "fine-tune"))
    return {"Authorization": f"Bearer {secret}"}


def _upload(http: TestClient, key: dict[str, str]) -> int:
    files = {"file": ("t.jsonl", b'{"text": "hi", "label": "a"}\n{"text": "yo", "label": "b"}\n')}
    return http.post("/v1/files", headers=key, files=files, data={"purpose": "fine-tune"}).status_code


def test_requests_per_minute_bind_files_and_fine_tuning(http: TestClient, loaded_platform: Platform) -> None:
    key = _key(loaded_platform, "busy", Limits(requests_per_minute=3))
    assert _upload(http, key) == 200
    assert http.get("/v1/files", headers=key).status_code == 200
    assert http.get("/v1/fine_tuning/jobs", headers=key).status_code == 200
    for method, path in (("GET", "/v1/fine_tuning/jobs"), ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/files")):
        resp = http.request(method, path, headers=key, json={})
        assert resp.status_code == 429, (method, path, resp.text)
        assert resp.json()["error"]["code"] == "rate_limit_exceeded" and int(resp.headers["Retry-After"]) >= 1
    assert _upload(http, key) == 429
    other = _key(loaded_platform, "calm", Limits(requests_per_minute=3))
    assert http.get("/v1/files", headers=other).status_code == 200  # a window of its own


def test_concurrency_limits_bind_files_and_fine_tuning(http: TestClient, loaded_platform: Platform) -> None:
    key = _key(loaded_platform, "solo", Limits(max_concurrent_requests=1))
    in_flight = loaded_platform.limiter.admit({"tenant:solo": Limits()})  # another request of the tenant
    for method, path in (("GET", "/v1/files"), ("POST", "/v1/fine_tuning/jobs"), ("GET", "/v1/fine_tuning/jobs/x")):
        resp = http.request(method, path, headers=key, json={})
        assert resp.status_code == 429, (method, path, resp.text)
        assert resp.json()["error"]["code"] == "concurrency_limit_exceeded"
    assert _upload(http, key) == 429
    in_flight.release()
    assert _upload(http, key) == 200
    assert http.get("/v1/files/file-000000000000000000000000", headers=key).status_code == 404  # fails, frees its slot
    assert http.get("/v1/fine_tuning/jobs", headers=key).status_code == 200
    assert loaded_platform.limiter.concurrent("tenant:solo") == 0


def test_spent_tokens_do_not_bind_requests_that_generate_none(http: TestClient, loaded_platform: Platform) -> None:
    key = _key(loaded_platform, "chatty", Limits(tokens_per_minute=10))
    loaded_platform.limiter.admit({"tenant:chatty": Limits()}).release(tokens=10)  # a chat that used them
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    resp = http.post("/v1/chat/completions", headers=key, json=chat)
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "tokens_limit_exceeded"
    assert http.get("/v1/files", headers=key).status_code == 200
    assert http.get("/v1/fine_tuning/jobs", headers=key).status_code == 200
