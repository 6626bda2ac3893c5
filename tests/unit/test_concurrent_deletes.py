"""Concurrent deletes of one object through the API: exactly one 200, the others 404, one audit event
(and of concurrent cancels of one job, one 200)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
RACERS = 8


@pytest.fixture
def http(platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform=platform)) as client:
        yield client


def race(http: TestClient, method: str, path: str) -> Counter[int]:
    """``RACERS`` threads send ``method path`` at the same moment; returns how many got each status."""
    start = threading.Barrier(RACERS)
    statuses: list[int] = []

    def delete() -> None:
        start.wait()
        statuses.append(http.request(method, path, headers=ADMIN).status_code)

    threads = [threading.Thread(target=delete) for _ in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Counter(statuses)


def test_one_of_concurrent_file_deletes_succeeds(http: TestClient, platform: Platform) -> None:
    line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
    upload = http.post("/v1/files", headers=ADMIN, data={"purpose": "fine-tune"}, files={"file": ("t.jsonl", line)})
    file_id = upload.json()["id"]
    assert race(http, "DELETE", f"/v1/files/{file_id}") == {200: 1, 404: RACERS - 1}
    assert len(platform.audit.query(action="file.delete")) == 1


def test_one_of_concurrent_model_deletes_succeeds(http: TestClient, platform: Platform, tiny_chat_dir: Path) -> None:
    record = platform.registry.pull(f"file:{tiny_chat_dir}", name="victim")
    assert race(http, "DELETE", f"/v1/models/victim@{record.version}") == {200: 1, 404: RACERS - 1}
    assert len(platform.audit.query(action="model.delete")) == 1
    assert http.get("/v1/models/victim", headers=ADMIN).status_code == 404


def test_one_of_concurrent_key_revokes_succeeds(http: TestClient, platform: Platform) -> None:
    info, _ = platform.keys.create("doomed")
    assert race(http, "DELETE", f"/v1/admin/keys/{info.id}") == {200: 1, 404: RACERS - 1}
    assert len(platform.audit.query(action="key.revoke")) == 1
    assert platform.keys.get(info.id).revoked_at is not None


def test_one_of_concurrent_job_cancels_succeeds(platform: Platform, tiny_chat_dir: Path) -> None:
    """A job is not deleted but cancelled: one cancel wins, the others find it already cancelled (400)."""
    platform.registry.pull(f"file:{tiny_chat_dir}", name="tiny-chat")
    no_workers = platform.settings.model_copy(update={"max_concurrent_jobs": 0})  # the job stays queued
    with TestClient(create_app(no_workers, platform=platform)) as http:
        line = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'
        files = {"file": ("t.jsonl", line * 4)}
        training = http.post("/v1/files", headers=ADMIN, data={"purpose": "fine-tune"}, files=files).json()["id"]
        body = {"model": "tiny-chat", "training_file": training}
        job = http.post("/v1/fine_tuning/jobs", headers=ADMIN, json=body)
        assert job.status_code == 200, job.text
        job_id = job.json()["id"]
        assert race(http, "POST", f"/v1/fine_tuning/jobs/{job_id}/cancel") == {200: 1, 400: RACERS - 1}
    assert len(platform.audit.query(action="job.cancel")) == 1
    assert platform.jobs.get("default", job_id).status == "cancelled"
