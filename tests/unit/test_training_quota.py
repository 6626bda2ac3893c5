"""The training CPU-seconds quota per tenant and day: workers' CPU time charged to the job and the
usage ledger, new jobs refused with 429 once spent, a running job stopped and failed with its
checkpoint kept, and resumed after the window resets. Also a disk full while checkpointing."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import openai
import pytest
from fastapi.testclient import TestClient

from llmos.kernel.supervisor import JobSupervisor
from llmos.platform import Platform
from llmos.registry.tables import JobRow
from llmos.security.limits import Limits
from llmos.training import worker
from llmos.training.metering import CpuMeter
from tests.conftest import ADMIN_KEY
from tests.unit.test_fine_tuning import drive

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Say the word number {i}"},
            {"role": "assistant", "content": "Paris is the capital of France."},
        ]
    }
    for i in range(12)
]
SLOW = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 8, "batch_size": 2}}}


def _upload(platform: Platform, rows: list[dict] = ROWS) -> str:
    data = "\n".join(json.dumps(r) for r in rows).encode()
    record, _ = platform.files.create(
        tenant="default", purpose="fine-tune", filename="t.jsonl", chunks=[data], max_bytes=1 << 20
    )
    return record.id


def _set_limit(platform: Platform, seconds: int | None) -> None:
    platform.tenants.update("default", limits=Limits(training_cpu_seconds=seconds))


def test_meter_charges_the_job_and_the_tenants_day(loaded_platform: Platform) -> None:
    p = loaded_platform
    job = p.jobs.create(tenant="default", body={"model": "tiny-chat", "training_file": _upload(p)})
    cpu = iter([2.5, 4.0, 10.0])
    meter = CpuMeter(p.jobs, p.training_quota, job.id, clock=lambda: next(cpu))
    _set_limit(p, 8)
    assert meter.charge() is None and meter.charge() is None
    assert p.jobs.get(None, job.id).cpu_seconds == pytest.approx(4.0)
    assert p.usage.training_cpu_seconds("default") == pytest.approx(4.0)
    over = meter.charge()
    assert over is not None and "10 of 8 CPU-seconds" in over and "quota" in over
    (row,) = [r for r in p.usage.query(tenant="default") if r.kind == "fine-tune"]
    assert (row.model, row.key_id, row.requests, row.cpu_seconds) == ("tiny-chat", "-", 0, 10.0)


def test_a_keys_quota_applies_to_its_own_jobs_besides_the_tenants(
    quiet_http: TestClient, loaded_platform: Platform
) -> None:
    p, http = loaded_platform, quiet_http
    limited, limited_secret = p.keys.create(
        "ci", scopes=("fine-tune",), limits=Limits(training_cpu_seconds=5, max_concurrent_jobs=1)
    )
    other, other_secret = p.keys.create("nightly", scopes=("fine-tune",))
    body = {"model": "tiny-chat", "training_file": _upload(p)}
    created = http.post("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {limited_secret}"}, json=body)
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]
    assert p.jobs.get(None, job_id).status == "queued"  # no supervisor runs here
    with p.db.session() as s:
        assert s.get(JobRow, job_id).key_id == limited.id  # type: ignore[union-attr]
    cpu = iter([6.0])
    assert "API key" in (CpuMeter(p.jobs, p.training_quota, job_id, clock=lambda: next(cpu)).charge() or "")
    assert p.usage.training_cpu_seconds("default", key_id=limited.id) == pytest.approx(6.0)
    assert p.usage.training_cpu_seconds("default", key_id=other.id) == 0.0
    refused = http.post("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {limited_secret}"}, json=body)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota_exceeded"
    assert "API key" in refused.json()["error"]["message"] and int(refused.headers["Retry-After"]) >= 1
    # The tenant has no limit and the other key none: its jobs are still taken.
    allowed = http.post("/v1/fine_tuning/jobs", headers={"Authorization": f"Bearer {other_secret}"}, json=body)
    assert allowed.status_code == 200, allowed.text
    http.post(f"/v1/fine_tuning/jobs/{allowed.json()['id']}/cancel", headers=AUTH)
    http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel", headers=AUTH)


def test_concurrent_job_limits_of_a_key_and_its_tenant(loaded_platform: Platform) -> None:
    p = loaded_platform
    key, _ = p.keys.create("ci", scopes=("fine-tune",), limits=Limits(max_concurrent_jobs=1))
    other, _ = p.keys.create("other", scopes=("fine-tune",))
    running = {None: 1, key.id: 1}  # one job of ``key`` runs
    assert not p.training_quota.job_slot_free("default", key.id, running)
    assert p.training_quota.job_slot_free("default", other.id, running)
    p.tenants.update("default", limits=Limits(max_concurrent_jobs=1))  # the tenant's limit binds every key
    assert not p.training_quota.job_slot_free("default", other.id, running)
    assert p.training_quota.job_slot_free("default", other.id, {})


@pytest.mark.slow
def test_quota_refuses_new_jobs_stops_a_running_one_and_it_resumes_after_reset(
    quiet_http: TestClient, quiet_client: openai.OpenAI, supervisor: JobSupervisor, loaded_platform: Platform
) -> None:
    p, http, client = loaded_platform, quiet_http, quiet_client
    training = _upload(p, ROWS * 4)
    job = client.fine_tuning.jobs.create(model="tiny-chat", training_file=training, method=SLOW)  # type: ignore[arg-type]
    drive(supervisor, client, job.id, lambda: bool(client.fine_tuning.jobs.checkpoints.list(job.id).data))
    # The admin lowers the quota below what the tenant has used today: the running job stops.
    patched = http.patch("/v1/admin/tenants/default", headers=AUTH, json={"limits": {"training_cpu_seconds": 1}})
    assert patched.status_code == 200 and patched.json()["limits"]["training_cpu_seconds"] == 1
    drive(supervisor, client, job.id, lambda: not supervisor.running)
    failed = client.fine_tuning.jobs.retrieve(job.id)
    assert failed.status == "failed", "the job finished before the quota stopped it"
    assert failed.error.code == "quota_exceeded"  # type: ignore[attr-defined]
    assert "CPU-seconds" in failed.error.message and "checkpoint is kept" in failed.error.message  # type: ignore[attr-defined]
    kept = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert kept and all(Path(row.path).is_dir() for row in _checkpoint_rows(p, job.id))

    refused = http.post("/v1/fine_tuning/jobs", headers=AUTH, json={"model": "tiny-chat", "training_file": training})
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "quota_exceeded" and refused.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(refused.headers["Retry-After"]) <= 86400

    usage = http.get("/v1/usage", headers=AUTH).json()["data"]
    training_rows = [u for u in usage if u["kind"] == "fine-tune"]
    assert training_rows and training_rows[0]["cpu_seconds"] > 1
    used = client.fine_tuning.jobs.retrieve(job.id).cpu_seconds  # type: ignore[attr-defined]
    assert used > 0 and used <= sum(u["cpu_seconds"] for u in training_rows) + 1e-6

    # Resumed while the quota is still spent, it waits in the queue; once the window resets it
    # continues from its checkpoint and succeeds.
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    supervisor.tick()
    assert client.fine_tuning.jobs.retrieve(job.id).status == "queued" and not supervisor.running  # quota spent
    _set_limit(p, None)
    supervisor.tick()
    assert supervisor.running == [job.id]
    drive(supervisor, client, job.id, lambda: not supervisor.running)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]
    assert any(m.startswith("Resumed from checkpoint") for m in messages)


def _checkpoint_rows(platform: Platform, job_id: str) -> list:
    from llmos.registry.tables import JobCheckpointRow

    with platform.db.session() as s:
        return list(s.query(JobCheckpointRow).filter_by(job_id=job_id))


@pytest.mark.slow
def test_disk_full_at_a_checkpoint_fails_the_job_clearly_and_it_resumes(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker itself, in this process, with the second checkpoint's write failing."""
    p = loaded_platform
    monkeypatch.setenv("LLMOS_HOME", str(p.settings.home))
    monkeypatch.setattr(worker, "_die_with_parent", lambda: None)
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}}}
    job = p.jobs.create(tenant="default", body={"model": "tiny-chat", "training_file": _upload(p), "method": method})
    assert p.jobs.claim(job.id) == 1  # as the supervisor does, which starts the worker for that attempt

    real_write = Path.write_bytes
    writes = 0

    def filling_write(self: Path, data: bytes) -> int:
        nonlocal writes
        if self.parent.name == "ckpt-epoch-2.tmp":  # the second epoch's checkpoint
            writes += 1
            real_write(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", filling_write)
    assert worker.run(job.id, 1) == 1
    monkeypatch.setattr(Path, "write_bytes", real_write)
    failed = p.jobs.get(None, job.id)
    assert failed.status == "failed" and writes == 1
    assert failed.error is not None and failed.error["code"] == "disk_full"
    assert "no space left on device while writing checkpoint ckpt-epoch-2" in failed.error["message"]
    work = p.settings.home / "jobs" / job.id
    assert sorted(d.name for d in work.iterdir() if d.name.startswith("ckpt")) == ["ckpt-epoch-1"]

    assert p.jobs.resume("default", job.id).status == "queued"  # space freed: resume it
    assert p.jobs.claim(job.id) == 2
    assert worker.run(job.id, 2) == 0
    done = p.jobs.get(None, job.id)
    assert done.status == "succeeded" and done.error is None and done.fine_tuned_model
    messages = [e["message"] for e in p.jobs.events("default", job.id, limit=100)[0]]
    assert any(m.startswith("Resumed from checkpoint") for m in messages)
