"""/v1/files through the official openai client: upload, validation, listing, content, delete,
tenant isolation, idempotency and size limits."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"
CHAT_LINE = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture
def http(platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform=platform)) as client:
        yield client


def client_for(http: TestClient, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)


@pytest.fixture
def client(http: TestClient) -> openai.OpenAI:
    return client_for(http, ADMIN_KEY)


def tenant_key(platform: Platform, tenant: str) -> str:
    platform.tenants.create(tenant)
    return platform.keys.create(f"{tenant}-files", tenant=tenant, scopes=("files",))[1]


def jsonl(*rows: dict) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


def test_upload_validate_list_retrieve_content_delete(client: openai.OpenAI) -> None:
    data = jsonl(CHAT_LINE, CHAT_LINE)
    created = client.files.create(file=("train.jsonl", data), purpose="fine-tune")
    assert created.object == "file" and created.id.startswith("file-")
    assert (created.status, created.bytes, created.filename) == ("processed", len(data), "train.jsonl")
    assert created.format == "chat" and created.records == 2  # type: ignore[attr-defined]
    assert [f.id for f in client.files.list().data] == [created.id]
    assert client.files.list(purpose="batch").data == []
    assert client.files.retrieve(created.id).sha256 == created.sha256  # type: ignore[attr-defined]
    assert client.files.content(created.id).content == data
    assert client.files.delete(created.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(created.id)


def test_real_sst2_tsv_is_recognised(client: openai.OpenAI) -> None:
    with (SHARED / "sst2" / "dev.tsv").open("rb") as f:
        created = client.files.create(file=f, purpose="fine-tune")
    assert created.status == "processed"
    assert created.format == "classification" and created.records == 872  # type: ignore[attr-defined]


def test_invalid_training_file_is_stored_with_its_error(client: openai.OpenAI) -> None:
    created = client.files.create(file=("bad.jsonl", jsonl(CHAT_LINE) + b"\n{oops"), purpose="fine-tune")
    assert created.status == "error"
    assert created.status_details is not None and "line 2" in created.status_details


def test_bad_purpose_and_missing_file_are_400(http: TestClient, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("x.jsonl", b"{}"), purpose="vision")  # type: ignore[arg-type]
    assert exc.value.body["param"] == "purpose"  # type: ignore[index]
    resp = http.post("/v1/files", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, data={"purpose": "fine-tune"})
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "file"


def test_path_like_filenames_are_reduced_to_a_name(client: openai.OpenAI) -> None:
    created = client.files.create(file=("../../etc/passwd", jsonl(CHAT_LINE)), purpose="fine-tune")
    assert created.filename == "passwd"


def test_another_tenants_file_is_invisible(http: TestClient, platform: Platform) -> None:
    alice = client_for(http, tenant_key(platform, "alice"))
    bob = client_for(http, tenant_key(platform, "bob"))
    secret = alice.files.create(file=("a.jsonl", jsonl(CHAT_LINE)), purpose="fine-tune")
    assert bob.files.list().data == []
    for call in (bob.files.retrieve, bob.files.content, bob.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(secret.id)
    assert alice.files.retrieve(secret.id).status == "processed"  # unchanged


def test_files_scope_is_required(http: TestClient, platform: Platform) -> None:
    inference_only = platform.keys.create("inf", scopes=("inference",))[1]
    with pytest.raises(openai.PermissionDeniedError):
        client_for(http, inference_only).files.list()


def test_idempotency_key_creates_one_file_under_concurrency(http: TestClient, client: openai.OpenAI) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}", "Idempotency-Key": "upload-1"}
    ids: list[str] = []

    def post() -> None:
        resp = http.post(
            "/v1/files", headers=headers, data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", jsonl(CHAT_LINE))}
        )
        ids.append(resp.json()["id"])

    threads = [threading.Thread(target=post) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids) == 20
    assert len(client.files.list().data) == 1
    conflict = http.post(
        "/v1/files",
        headers=headers,
        data={"purpose": "fine-tune"},
        files={"file": ("t.jsonl", jsonl(CHAT_LINE, CHAT_LINE))},
    )
    assert conflict.status_code == 409
    assert conflict.json()["error"]["code"] == "idempotency_key_reused"


def test_upload_over_the_limit_is_413_and_leaves_nothing(platform: Platform) -> None:
    settings = platform.settings.model_copy(update={"max_upload_bytes": 4096})
    import dataclasses

    small = dataclasses.replace(platform, settings=settings)
    with TestClient(create_app(platform=small)) as http:
        resp = http.post(
            "/v1/files",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            data={"purpose": "fine-tune"},
            files={"file": ("big.jsonl", io.BytesIO(b"x" * 100_000))},
        )
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "payload_too_large"
        assert http.get("/v1/files", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["data"] == []
    blobs = [p for p in (platform.settings.store_dir / "sha256").rglob("*") if p.is_file()]
    assert blobs == []


def test_batch_files_are_checked(client: openai.OpenAI) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": body}
    assert client.files.create(file=("b.jsonl", jsonl(line)), purpose="batch").status == "processed"
    dup = client.files.create(file=("b.jsonl", jsonl(line, line)), purpose="batch")
    assert dup.status == "error" and "duplicate custom_id" in (dup.status_details or "")


def test_chunked_upload_without_length_is_cut_off_at_the_limit(platform: Platform) -> None:
    import dataclasses

    settings = platform.settings.model_copy(update={"max_upload_bytes": 4096})
    boundary = "llmosboundary"

    def body() -> Iterator[bytes]:
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        for _ in range(50):
            yield b"x" * 1000
        yield f"\r\n--{boundary}--\r\n".encode()

    with TestClient(create_app(platform=dataclasses.replace(platform, settings=settings))) as http:
        resp = http.post(
            "/v1/files",
            content=body(),
            headers={
                "Authorization": f"Bearer {ADMIN_KEY}",
                "Content-Type": f"multipart/form-data; boundary={boundary}",
            },
        )
        assert resp.status_code == 413
        assert resp.json()["error"]["code"] == "payload_too_large"
        assert http.get("/health").status_code == 200
    assert [p for p in (platform.settings.store_dir / "sha256").rglob("*") if p.is_file()] == []
