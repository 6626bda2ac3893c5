"""Uploads stream: neither the file store nor the HTTP path holds a whole upload in memory
(allocations traced with tracemalloc); the storage quota answers 403 in OpenAI's error shape."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
LINE = json.dumps({"messages": [{"role": "user", "content": "hi " * 1000}, {"role": "assistant", "content": "yo"}]})
LINE_BYTES = (LINE + "\n").encode()
BODY_BYTES = 16 * 1024 * 1024
MEMORY_BOUND = 8 * 1024 * 1024
"""Half the body's size: an upload read whole anywhere would exceed it. The HTTP path's peak measured
3.5 MB here (the multipart parser's 1 MB spool and its chunk buffers), and the suite's other threads
allocate under the same trace, so a bound nearer that peak fails by chance."""


def jsonl_chunks(total: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    block = LINE_BYTES * (chunk // len(LINE_BYTES))
    for _ in range(total // len(block) + 1):
        yield block


def traced_peak(call: Callable[[], Any]) -> tuple[Any, int]:
    tracemalloc.start()
    try:
        result = call()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_file_store_validates_an_upload_larger_than_its_memory_bound(platform: Platform) -> None:
    (record, _), peak = traced_peak(
        lambda: platform.files.create(
            tenant="acme", purpose="fine-tune", filename="big.jsonl", chunks=jsonl_chunks(BODY_BYTES), max_bytes=1 << 30
        )
    )
    assert record.status == "processed" and record.bytes > BODY_BYTES
    assert record.summary["records"] == record.bytes // len(LINE_BYTES)
    assert peak < MEMORY_BOUND, f"peak {peak} bytes traced for a {record.bytes}-byte upload"


def multipart_chunks(boundary: str) -> Iterator[bytes]:
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    yield from jsonl_chunks(BODY_BYTES)
    yield f"\r\n--{boundary}--\r\n".encode()


async def post_streamed(app: Any, path: str, headers: dict[str, str], chunks: Iterator[bytes]) -> tuple[int, bytes]:
    """Drive the ASGI app as a server would: the body arrives in many messages, not one."""
    replied = anyio.Event()
    status, body = 0, bytearray()
    pending = iter(chunks)
    ended = False

    async def receive() -> dict[str, Any]:
        nonlocal ended
        chunk = next(pending, None)
        if chunk is not None:
            return {"type": "http.request", "body": chunk, "more_body": True}
        if not ended:
            ended = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await replied.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))
            if not message.get("more_body"):
                replied.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    await app(scope, receive, send)
    return status, bytes(body)


@pytest.mark.slow  # about 12 s here: a 16 MB multipart body parsed under tracemalloc
def test_http_upload_never_holds_the_body_in_memory(platform: Platform) -> None:
    boundary = "llmosboundary"
    headers = {
        "Host": "testserver",
        "Authorization": f"Bearer {ADMIN_KEY}",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
    }
    app = create_app(platform=platform)
    with TestClient(app) as http:  # runs the lifespan; the request itself is driven below
        assert http.portal is not None
        portal = http.portal
        (status, body), peak = traced_peak(
            lambda: portal.call(post_streamed, app, "/v1/files", headers, multipart_chunks(boundary))
        )
    assert status == 200, body[:500]
    assert json.loads(body)["bytes"] > BODY_BYTES
    assert peak < MEMORY_BOUND, f"peak {peak} bytes traced for a {BODY_BYTES}-byte upload"


def test_storage_quota_is_a_403_in_openai_shape_per_tenant(platform: Platform) -> None:
    with TestClient(create_app(platform=platform)) as http:
        assert http.post("/v1/admin/tenants", headers=ADMIN, json={"id": "acme"}).status_code == 201
        key = http.post("/v1/admin/keys", headers=ADMIN, json={"name": "k", "tenant": "acme", "scopes": ["files"]})
        acme = {"Authorization": f"Bearer {key.json()['key']}"}
        limited = http.patch(
            "/v1/admin/tenants/acme", headers=ADMIN, json={"limits": {"storage_bytes": 2 * len(LINE_BYTES)}}
        )
        assert limited.status_code == 200, limited.text

        def post(headers: dict[str, str]) -> Any:
            return http.post(
                "/v1/files", headers=headers, data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", LINE_BYTES)}
            )

        assert post(acme).status_code == 200
        assert post(acme).status_code == 200
        refused = post(acme)
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert error["code"] == "storage_quota_exceeded" and error["param"] == "file"
        assert set(error) == {"message", "type", "param", "code"}
        assert post(ADMIN).status_code == 200  # the default tenant has no quota
        assert len(http.get("/v1/files", headers=acme).json()["data"]) == 2


def test_a_fine_tuning_job_is_refused_when_its_model_could_not_be_stored(loaded_platform: Platform) -> None:
    with TestClient(create_app(platform=loaded_platform)) as http:
        assert http.post("/v1/admin/tenants", headers=ADMIN, json={"id": "acme"}).status_code == 201
        scopes = ["files", "fine-tune"]
        key = http.post("/v1/admin/keys", headers=ADMIN, json={"name": "k", "tenant": "acme", "scopes": scopes})
        acme = {"Authorization": f"Bearer {key.json()['key']}"}
        quota = {"limits": {"storage_bytes": len(LINE_BYTES)}}
        assert http.patch("/v1/admin/tenants/acme", headers=ADMIN, json=quota).status_code == 200
        upload = {"purpose": "fine-tune"}, {"file": ("t.jsonl", LINE_BYTES)}
        training = http.post("/v1/files", headers=acme, data=upload[0], files=upload[1]).json()["id"]
        job = {"model": "tiny-chat", "training_file": training}
        refused = http.post("/v1/fine_tuning/jobs", headers=acme, json=job)  # the quota is full: no room for a model
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "storage_quota_exceeded"
        assert http.get("/v1/fine_tuning/jobs", headers=acme).json()["data"] == []  # nothing queued
        more = {"limits": {"storage_bytes": 2 * len(LINE_BYTES)}}
        assert http.patch("/v1/admin/tenants/acme", headers=ADMIN, json=more).status_code == 200
        loaded_platform.files.require_room("acme")  # room again: no refusal
