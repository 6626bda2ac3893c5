"""Fine-tuning jobs on two `llmos serve` processes sharing one PostgreSQL database and one data
directory (issue 21, point 3): jobs submitted through both run exactly once, an idempotency key
holds across servers, a job whose server is killed mid-run is judged orphaned by its heartbeat's
age and resumed from its checkpoint by the other server, and usage and audit rows are complete.

A tiny random chat model keeps the jobs short; the orphan is judged after the supervisor's
30 seconds of silence (``supervisor.STALE_AFTER``)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llmos.config import Settings
from llmos.platform import Platform
from tests.integration.conftest import ADMIN_KEY, Server, start_server, stop_server
from tests.postgres import postgres_server

pytestmark = pytest.mark.integration

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Say the word number {i}"},
            {"role": "assistant", "content": "Paris is the capital of France."},
        ]
    }
    for i in range(12)
]
TRAINING = "\n".join(json.dumps(r) for r in ROWS * 8).encode()
SHORT = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}}
LONG_EPOCHS = 8
SCOPES = ["inference", "files", "fine-tune"]
LONG = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": LONG_EPOCHS, "batch_size": 2}}}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, tiny_chat_dir: Path) -> Iterator[list[Server]]:
    home = tmp_path_factory.mktemp("two-servers-jobs")
    with postgres_server() as url:
        platform = Platform.open(Settings(home=home, database_url=url))
        try:
            platform.registry.pull(f"file:{tiny_chat_dir}", name="tiny-chat")
        finally:
            platform.close()
        settings = {"database_url": url, "default_models": "[]", "dtype": "float32", "max_concurrent_jobs": "1"}
        started = [start_server(home, **settings)]
        try:
            started.append(start_server(home, **settings))
            yield started
        finally:
            for server in started:
                stop_server(server)


def _admin(server: Server, method: str, path: str, **kwargs: Any) -> Any:
    reply = httpx.request(method, f"{server.url}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, **kwargs)
    reply.raise_for_status()
    return reply.json()


def _until(check: Callable[[], Any], what: str, timeout: float = 240) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _finished(client: openai.OpenAI, job_id: str) -> Any:
    job = _until(
        lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in ("succeeded", "failed", "cancelled") and j,
        f"job {job_id} to finish",
    )
    assert job.status == "succeeded", job.error
    return job


def _messages(client: openai.OpenAI, job_id: str) -> list[str]:
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=500).data]


def _workers(job_id: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", f"llmos.training.worker {job_id}"], capture_output=True, text=True)
    return found.stdout.split()


def _server_running(servers: list[Server], job_id: str) -> Server | None:
    """The server whose supervisor spawned the job's worker (its worker's parent process)."""
    for pid in _workers(job_id):
        try:
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # the worker ended meanwhile
        for server in servers:
            if server.process.pid == parent:
                return server
    return None


def test_jobs_on_two_servers_run_once_and_a_killed_servers_job_resumes_on_the_other(servers: list[Server]) -> None:
    first, second = servers
    _admin(first, "POST", "/v1/admin/tenants", json={"id": "acme"})
    secret = _admin(second, "POST", "/v1/admin/keys", json={"name": "app", "tenant": "acme", "scopes": SCOPES})
    clients = [openai.OpenAI(base_url=f"{s.url}/v1", api_key=secret["key"], max_retries=0) for s in servers]

    # The same upload and the same job request, each sent to both servers: one file, one job.
    uploads = {
        c.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune", extra_headers={"Idempotency-Key": "f-1"}).id
        for c in clients
    }
    (training,) = uploads
    created = {
        c.fine_tuning.jobs.create(
            model="tiny-chat", training_file=training, method=SHORT, extra_headers={"Idempotency-Key": "job-1"}
        ).id  # type: ignore[arg-type]
        for c in clients
    }
    (short,) = created
    _finished(clients[1], short)
    starts = [m for m in _messages(clients[0], short) if m.startswith("Fine-tuning job started")]
    assert starts == ["Fine-tuning job started (attempt 1)"]  # claimed by one supervisor of the two

    for c in clients:  # one chat request to each server
        c.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2)

    # A longer job, killed with the server that runs it after its first checkpoint.
    long = clients[1].fine_tuning.jobs.create(model="tiny-chat", training_file=training, method=LONG).id  # type: ignore[arg-type]
    _until(lambda: clients[0].fine_tuning.jobs.checkpoints.list(long).data, "the first checkpoint")
    running = _until(lambda: _server_running(servers, long), "the job's worker")
    running.process.send_signal(signal.SIGKILL)
    running.process.wait(timeout=30)
    survivor = clients[servers.index(second if running is first else first)]
    done = _finished(survivor, long)  # judged orphaned once its heartbeat is 30 s old, then resumed
    messages = _messages(survivor, long)
    assert any("stopped answering" in m for m in messages)
    assert any(m.startswith("Resumed from checkpoint") for m in messages)
    starts = [m for m in messages if m.startswith("Fine-tuning job started")]
    assert sorted(starts) == ["Fine-tuning job started (attempt 1)", "Fine-tuning job started (attempt 2)"]
    assert len(survivor.fine_tuning.jobs.checkpoints.list(long, limit=100).data) == LONG_EPOCHS  # none twice
    assert done.fine_tuned_model

    # Usage: the training CPU time charged to the tenant is what its jobs used, on both servers, and
    # both chat requests are counted.
    alive = servers[clients.index(survivor)]
    _until(lambda: not _workers(long), "the worker to exit")  # its last CPU time is charged as it ends

    def chat_requests() -> int:
        rows = _admin(alive, "GET", "/v1/usage", params={"tenant": "acme"})["data"]
        return sum(r["requests"] for r in rows if r["kind"] == "chat")

    _until(lambda: chat_requests() == 2, "the chat requests' usage")  # written off the request path
    rows = _admin(alive, "GET", "/v1/usage", params={"tenant": "acme"})["data"]
    charged = sum(r["cpu_seconds"] for r in rows if r["kind"] == "fine-tune")
    used = sum(survivor.fine_tuning.jobs.retrieve(j).cpu_seconds for j in (short, long))  # type: ignore[attr-defined]
    assert charged == pytest.approx(used, abs=0.01) and used > 0
    # Audit: every request that created something is recorded, whichever server took it.
    events = _admin(alive, "GET", "/v1/admin/audit", params={"limit": 1000})["data"]
    audited = [(e["action"], e.get("target")) for e in events]
    assert audited.count(("job.create", short)) == 2 and audited.count(("job.create", long)) == 1
    assert ("tenant.create", "acme") in audited
