"""Model management over HTTP: pulls as operations (followed, cancelled), description and tags,
load/pin and unload on the real engine, what is resident, and who may do what."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from llmos.platform import Platform
from llmos.registry.sources.base import ModelSource, Progress, register_source
from tests.conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _tenant_key(platform: Platform, tenant: str, scopes: tuple[str, ...] = ("models", "inference")) -> dict[str, str]:
    platform.tenants.create(tenant)
    _, secret = platform.keys.create(f"{tenant}-key", tenant=tenant, scopes=scopes)
    return {"Authorization": f"Bearer {secret}"}


def _finished(http: TestClient, pull_id: str, headers: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        op: dict[str, Any] = http.get(f"/v1/model_pulls/{pull_id}", headers=headers).json()
        if op["status"] != "running":
            return op
        time.sleep(0.05)
    raise AssertionError(f"pull {pull_id} did not finish")


class GatedSource(ModelSource):
    """``gated:<dir>``: reports two chunks of progress, the second only once the test opens the gate."""

    scheme = "gated"
    reached = threading.Event()
    gate = threading.Event()

    def fetch(self, spec: str, staging: Path, cache: Path, progress: Progress) -> Path:
        progress.stage("downloading", total=2)
        progress.advance(1)
        GatedSource.reached.set()
        GatedSource.gate.wait(30)
        progress.advance(1)
        return Path(spec)


register_source(GatedSource)


def test_a_pull_is_an_operation_with_stages_bytes_and_events(http: TestClient, tiny_chat_dir: Path) -> None:
    body = {"model": f"file:{tiny_chat_dir}", "name": "pulled-chat", "description": "a tiny chat", "tags": ["demo"]}
    resp = http.post("/v1/model_pulls", headers=ADMIN, json=body)
    assert resp.status_code == 202, resp.text
    op = _finished(http, resp.json()["id"], ADMIN)
    assert op["status"] == "succeeded", op
    assert op["model"] == "pulled-chat@1"
    assert any(s.startswith("storing") for s in op["stages"])
    assert op["done_bytes"] == op["total_bytes"] > 0
    # The events of a finished pull: its final state, then the stream ends.
    with http.stream("GET", f"/v1/model_pulls/{op['id']}/events", headers=ADMIN) as stream:
        events = [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1]["status"] == "succeeded"
    model = http.get("/v1/models/pulled-chat", headers=ADMIN).json()
    assert (model["description"], model["tags"], model["owned_by"]) == ("a tiny chat", ["demo"], "system")
    assert op["id"] in [p["id"] for p in http.get("/v1/model_pulls", headers=ADMIN).json()["data"]]


def test_a_cancelled_pull_registers_nothing_and_leaves_no_staging(
    http: TestClient, loaded_platform: Platform, tiny_chat_dir: Path
) -> None:
    GatedSource.reached.clear()
    GatedSource.gate.clear()
    resp = http.post("/v1/model_pulls", headers=ADMIN, json={"model": f"gated:{tiny_chat_dir}", "name": "gated"})
    pull_id = resp.json()["id"]
    assert GatedSource.reached.wait(30)
    seen = http.get(f"/v1/model_pulls/{pull_id}", headers=ADMIN).json()
    assert (seen["stage"], seen["done_bytes"], seen["total_bytes"]) == ("downloading", 1, 2)
    assert http.post(f"/v1/model_pulls/{pull_id}/cancel", headers=ADMIN).status_code == 200
    GatedSource.gate.set()
    op = _finished(http, pull_id, ADMIN)
    assert op["status"] == "cancelled", op
    assert http.get("/v1/models/gated", headers=ADMIN).status_code == 404
    assert list((loaded_platform.settings.home / "tmp").glob("pull-*")) == []


def test_a_failed_pull_reports_the_error_in_the_openai_shape(http: TestClient, tmp_path: Path) -> None:
    resp = http.post("/v1/model_pulls", headers=ADMIN, json={"model": f"file:{tmp_path / 'missing'}"})
    op = _finished(http, resp.json()["id"], ADMIN)
    assert op["status"] == "failed"
    assert set(op["error"]) == {"message", "type", "param", "code"}
    assert op["error"]["code"] == "source_unavailable"


def test_description_and_tags_are_edited_and_validated(http: TestClient) -> None:
    resp = http.patch("/v1/models/tiny-chat", headers=ADMIN, json={"description": "for tests", "tags": ["a", "b"]})
    assert resp.status_code == 200, resp.text
    assert (resp.json()["description"], resp.json()["tags"]) == ("for tests", ["a", "b"])
    assert http.patch("/v1/models/tiny-chat", headers=ADMIN, json={"tags": ["ok"]}).json()["description"] == "for tests"
    for bad in ({"tags": ["no spaces"]}, {"colour": "red"}, {"description": "x" * 2001}):
        resp = http.patch("/v1/models/tiny-chat", headers=ADMIN, json=bad)
        assert resp.status_code == 400, bad
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert http.get("/v1/models/tiny-chat", headers=ADMIN).json()["tags"] == ["ok"]


def test_load_pins_a_model_until_unload(http: TestClient) -> None:
    resp = http.post("/v1/models/tiny-chat/load", headers=ADMIN, json={"pin": True})
    assert resp.status_code == 200, resp.text
    resident = http.get("/v1/resident_models", headers=ADMIN).json()
    [entry] = [m for m in resident["data"] if m["name"] == "tiny-chat"]
    assert entry["pinned"] is True
    assert entry["memory_bytes"] > 0
    assert resident["resident_bytes"] >= entry["memory_bytes"]
    assert http.post("/v1/models/tiny-chat/unload", headers=ADMIN).status_code == 200
    names = [m["name"] for m in http.get("/v1/resident_models", headers=ADMIN).json()["data"]]
    assert "tiny-chat" not in names


def test_tenants_pull_their_own_models_and_change_nothing_shared(
    http: TestClient, loaded_platform: Platform, tiny_chat_dir: Path
) -> None:
    acme = _tenant_key(loaded_platform, "acme")
    other = _tenant_key(loaded_platform, "other")
    # file: reads the server's disk: refused for a tenant, with nothing started.
    resp = http.post("/v1/model_pulls", headers=acme, json={"model": f"file:{tiny_chat_dir}"})
    assert (resp.status_code, resp.json()["error"]["code"]) == (400, "source_refused")
    assert http.get("/v1/model_pulls", headers=acme).json()["data"] == []
    for method, path in (
        ("PATCH", "/v1/models/tiny-chat"),
        ("POST", "/v1/models/tiny-chat/load"),
        ("POST", "/v1/models/tiny-chat/unload"),
        ("DELETE", "/v1/models/tiny-chat"),
    ):
        resp = http.request(method, path, headers=acme, json={"description": "mine"} if method == "PATCH" else None)
        assert resp.status_code == 403, (method, path, resp.text)
    assert http.get("/v1/models/tiny-chat", headers=ADMIN).json()["description"] is None
    # A pull an admin started is not another tenant's to see or cancel.
    admin_pull = http.post("/v1/model_pulls", headers=ADMIN, json={"model": f"file:{tiny_chat_dir}", "name": "x"})
    pull_id = admin_pull.json()["id"]
    assert http.get(f"/v1/model_pulls/{pull_id}", headers=other).status_code == 404
    assert http.post(f"/v1/model_pulls/{pull_id}/cancel", headers=other).status_code == 404
    _finished(http, pull_id, ADMIN)
    # An inference-only key may not manage models at all.
    reader = {"Authorization": f"Bearer {loaded_platform.keys.create('r', tenant='acme', scopes=('inference',))[1]}"}
    assert http.get("/v1/model_pulls", headers=reader).status_code == 403


def test_a_tenants_model_is_its_own_to_change_and_hidden_from_others(
    http: TestClient, loaded_platform: Platform, tiny_chat_dir: Path
) -> None:
    from llmos.registry.records import Lineage

    acme = _tenant_key(loaded_platform, "acme")
    other = _tenant_key(loaded_platform, "other")
    loaded_platform.registry.pull(f"file:{tiny_chat_dir}", name="acme-chat", lineage=Lineage(owner="acme"))
    assert http.patch("/v1/models/acme-chat", headers=acme, json={"tags": ["x"]}).status_code == 200
    assert http.patch("/v1/models/acme-chat", headers=other, json={"tags": ["y"]}).status_code == 404
    assert "acme-chat" not in [m["id"] for m in http.get("/v1/models", headers=other).json()["data"]]
    # The name is acme's: nobody else registers a version of it.
    with pytest.raises(Exception, match="taken by another owner"):
        loaded_platform.registry.pull(f"file:{tiny_chat_dir}", name="acme-chat")
    assert http.delete("/v1/models/acme-chat", headers=acme).status_code == 200
