"""Tenants, scoped keys, limits, usage, audit and edge checks through the HTTP API."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.api.app import api_routes
from llmos.api.health import PUBLIC_PATHS
from llmos.config import Settings
from llmos.platform import Platform
from llmos.registry.tables import ModelRow
from llmos.security.limits import Limits
from tests.conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
CHAT = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}


def _scopes(dependant: object) -> set[str]:
    found = set()
    for dep in getattr(dependant, "dependencies", []):
        scope = getattr(dep.call, "required_scope", None)
        if scope:
            found.add(scope)
        found |= _scopes(dep)
    return found


def test_every_route_declares_a_scope_or_is_explicitly_public() -> None:
    routes = api_routes(create_app(Settings()))
    assert len(routes) > 10
    for info in routes:
        if info.path in PUBLIC_PATHS:
            assert not _scopes(info.route.dependant), f"{info.path} is public but asks for a scope"
        else:
            assert _scopes(info.route.dependant), f"{info.methods} {info.path} declares no scope"


def test_route_sweep_without_a_valid_key_is_401_everywhere(http: TestClient, loaded_platform: Platform) -> None:
    info, revoked = loaded_platform.keys.create("gone", scopes=("admin",))
    loaded_platform.keys.revoke(info.id)
    variants = [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": f"Bearer {revoked}"},
        {"Authorization": f"Basic {ADMIN_KEY}"},
    ]
    loaded_platform.audit.denied.per_minute = 100_000  # every denial answered 401, none throttled to 429
    swept = 0
    for info in api_routes(http.app):  # type: ignore[arg-type]
        if info.path in PUBLIC_PATHS:
            continue
        path = re.sub(r"\{[^}]+\}", "x", info.path)
        for method in info.methods:
            swept += 1
            for headers in variants:
                resp = http.request(method, path, headers=headers, json={})
                assert resp.status_code == 401, (method, path, headers, resp.text)
            assert http.request(method, f"{path}?api_key={ADMIN_KEY}", json={}).status_code == 401
    assert swept > 10


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""])
def test_foreign_host_header_is_refused_on_loopback(loaded_platform: Platform, host: str) -> None:
    settings = loaded_platform.settings.model_copy(update={"allowed_hosts": []})
    platform = dataclasses.replace(loaded_platform, settings=settings)
    with TestClient(create_app(platform=platform), base_url="http://127.0.0.1") as client:
        assert client.get("/health").status_code == 200
        assert client.get("/health", headers={"Host": "localhost:8000"}).status_code == 200
        resp = client.get("/health", headers={"Host": host})
        assert resp.status_code == 400
        assert resp.json()["error"]["code"] == "invalid_host"


def _tenant_key(http: TestClient, tenant: str, **limits: int) -> str:
    assert http.post("/v1/admin/tenants", headers=ADMIN, json={"id": tenant, "limits": limits}).status_code == 201
    resp = http.post("/v1/admin/keys", headers=ADMIN, json={"name": f"{tenant}-app", "tenant": tenant})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["key"].startswith("sk-llmos-") and "key_hash" not in body
    return str(body["key"])


def test_requests_per_minute_limit_gives_429_with_retry_after(http: TestClient) -> None:
    key = {"Authorization": f"Bearer {_tenant_key(http, 'acme', requests_per_minute=2)}"}
    assert http.post("/v1/chat/completions", headers=key, json=CHAT).status_code == 200
    assert http.post("/v1/embeddings", headers=key, json={"model": "tiny-embed", "input": "x"}).status_code == 200
    resp = http.post("/v1/chat/completions", headers=key, json=CHAT)
    assert resp.status_code == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert resp.json()["error"]["type"] == "rate_limit_error"
    other = {"Authorization": f"Bearer {_tenant_key(http, 'other')}"}
    assert http.post("/v1/chat/completions", headers=other, json=CHAT).status_code == 200


def test_concurrency_limit_and_streams_release_their_slot(http: TestClient, loaded_platform: Platform) -> None:
    key = {"Authorization": f"Bearer {_tenant_key(http, 'solo', max_concurrent_requests=1)}"}
    in_flight = loaded_platform.limiter.admit({"tenant:solo": Limits()})  # another request of the tenant
    resp = http.post("/v1/chat/completions", headers=key, json=CHAT)
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "concurrency_limit_exceeded"
    in_flight.release()
    with http.stream("POST", "/v1/chat/completions", headers=key, json={**CHAT, "stream": True}) as stream:
        assert list(stream.iter_lines())[-2] == "data: [DONE]"
    assert http.post("/v1/chat/completions", headers=key, json=CHAT).status_code == 200


def test_failed_requests_do_not_hold_a_concurrency_slot(http: TestClient) -> None:
    key = {"Authorization": f"Bearer {_tenant_key(http, 'oops', max_concurrent_requests=1)}"}
    for _ in range(3):
        assert http.post("/v1/chat/completions", headers=key, json={**CHAT, "model": "nope"}).status_code == 404
    assert http.post("/v1/chat/completions", headers=key, json=CHAT).status_code == 200


def test_usage_is_recorded_per_tenant_and_private(http: TestClient, loaded_platform: Platform) -> None:
    a = {"Authorization": f"Bearer {_tenant_key(http, 'tenant-a')}"}
    b = {"Authorization": f"Bearer {_tenant_key(http, 'tenant-b')}"}
    reply = http.post("/v1/chat/completions", headers=a, json=CHAT).json()
    http.post("/v1/embeddings", headers=b, json={"model": "tiny-embed", "input": "hello"})
    loaded_platform._usage_writer.submit(lambda: None).result()  # wait for the writer thread
    rows = http.get("/v1/usage", headers=a).json()["data"]
    assert {r["tenant"] for r in rows} == {"tenant-a"}
    assert rows[0]["prompt_tokens"] == reply["usage"]["prompt_tokens"]
    assert rows[0]["completion_tokens"] == reply["usage"]["completion_tokens"]
    assert http.get("/v1/usage?tenant=tenant-b", headers=a).json()["data"] == rows  # cannot peek at b
    everyone = http.get("/v1/usage", headers=ADMIN).json()["data"]
    assert {r["tenant"] for r in everyone} >= {"tenant-a", "tenant-b"}


def test_admin_routes_need_the_admin_scope_and_are_audited(http: TestClient) -> None:
    key = {"Authorization": f"Bearer {_tenant_key(http, 'plain')}"}
    assert http.get("/v1/admin/tenants", headers=key).status_code == 403
    assert http.post("/v1/admin/keys", headers=key, json={"name": "x", "scopes": ["admin"]}).status_code == 403
    events = http.get("/v1/admin/audit", headers=ADMIN).json()["data"]
    actions = [e["action"] for e in events]
    assert "tenant.create" in actions and "key.create" in actions
    denied = [e for e in events if e["action"] == "auth.denied"]
    assert denied and denied[0]["tenant"] == "plain" and denied[0]["outcome"] == "denied"


@pytest.mark.parametrize(
    "body",
    [
        {"id": "acme", "owner": "root"},
        {"id": "acme", "limits": {"requests_per_minute": -5}},
        {"id": "../etc"},
        {"id": "system"},
    ],
)
def test_bad_tenant_bodies_are_refused(http: TestClient, body: dict) -> None:
    resp = http.post("/v1/admin/tenants", headers=ADMIN, json=body)
    assert resp.status_code == 400
    assert http.get("/v1/admin/tenants/acme", headers=ADMIN).status_code == 404


def test_key_for_unknown_tenant_or_scope_is_refused(http: TestClient) -> None:
    assert http.post("/v1/admin/keys", headers=ADMIN, json={"name": "x", "tenant": "ghost"}).status_code == 404
    assert http.post("/v1/admin/keys", headers=ADMIN, json={"name": "x", "scopes": ["root"]}).status_code == 400
    assert http.post("/v1/admin/keys", headers=ADMIN, json={"name": "x", "expires_at": 1}).status_code == 400


def test_disabled_tenant_is_refused(http: TestClient) -> None:
    key = {"Authorization": f"Bearer {_tenant_key(http, 'paused')}"}
    assert http.patch("/v1/admin/tenants/paused", headers=ADMIN, json={"disabled": True}).status_code == 200
    resp = http.post("/v1/chat/completions", headers=key, json=CHAT)
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "tenant_disabled"


def test_revoking_a_key_through_the_api(http: TestClient) -> None:
    secret = _tenant_key(http, "rev")
    key_id = secret.split("-")[2]
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 200  # now cached
    assert http.delete(f"/v1/admin/keys/{key_id}", headers=ADMIN).json()["revoked_at"] is not None
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}).status_code == 401


def test_another_tenants_model_is_invisible(http: TestClient, loaded_platform: Platform, tiny_chat_dir: Path) -> None:
    """A tenant-owned model (as fine-tuning will register) is 404 for every other tenant, everywhere."""
    record = loaded_platform.registry.pull(f"file:{tiny_chat_dir}", name="acme-private")
    with loaded_platform.db.session() as s:
        s.get(ModelRow, record.id).owner = "owner-co"  # type: ignore[union-attr]
    owner = {"Authorization": f"Bearer {_tenant_key(http, 'owner-co')}"}
    stranger = {"Authorization": f"Bearer {_tenant_key(http, 'stranger')}"}
    body = {**CHAT, "model": "acme-private"}
    assert http.post("/v1/chat/completions", headers=owner, json=body).status_code == 200
    assert "acme-private" in [m["id"] for m in http.get("/v1/models", headers=owner).json()["data"]]
    assert http.post("/v1/chat/completions", headers=stranger, json=body).status_code == 404
    completion = {"model": "acme-private", "prompt": "x", "max_tokens": 2}
    assert http.post("/v1/completions", headers=stranger, json=completion).status_code == 404
    assert http.get("/v1/models/acme-private", headers=stranger).status_code == 404
    assert "acme-private" not in [m["id"] for m in http.get("/v1/models", headers=stranger).json()["data"]]
    assert "tiny-chat" in [m["id"] for m in http.get("/v1/models", headers=stranger).json()["data"]]  # shared base
    assert loaded_platform.registry.get("acme-private").owner == "owner-co"  # unchanged
