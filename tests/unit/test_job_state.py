"""One owner of job state: the transition table, the job store's atomic moves, and the
supervisor driven tick by tick (its worker a plain `sleep` process, so no training runs):
two supervisors on one database, orphans judged by heartbeat age, a disabled tenant's queue."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from itertools import product

import pytest

from llmos.config import Settings
from llmos.errors import InvalidRequestError
from llmos.kernel.job_status import TRANSITIONS, IllegalTransition, JobStatus, StopRequest, check_transition
from llmos.kernel.supervisor import JobSupervisor
from llmos.platform import Platform
from llmos.registry.tables import JobRow

ROWS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(4)]


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The supervisors' workers: processes that only wait to be stopped."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        process.kill()
        process.wait()


def supervisor(platform: Platform, sleepers: list[subprocess.Popen[bytes]], jobs: int = 2) -> JobSupervisor:
    def spawn(job_id: str, attempt: int, settings: Settings) -> subprocess.Popen[bytes]:
        sleepers.append(subprocess.Popen(["sleep", "300"]))
        return sleepers[-1]

    settings = platform.settings.model_copy(update={"max_concurrent_jobs": jobs})
    return JobSupervisor(platform.jobs, platform.training_quota, settings, spawn=spawn)


def new_job(platform: Platform, tenant: str = "default") -> str:
    data = "\n".join(json.dumps(r) for r in ROWS).encode()
    record, _ = platform.files.create(
        tenant=tenant, purpose="fine-tune", filename="t.jsonl", chunks=[data], max_bytes=1 << 20
    )
    return platform.jobs.create(tenant=tenant, body={"model": "tiny-chat", "training_file": record.id}).id


def status(platform: Platform, job_id: str) -> JobStatus:
    return platform.jobs.get(None, job_id).status


def age_heartbeat(platform: Platform, job_id: str, seconds: float) -> None:
    """As if the job's worker last beat ``seconds`` ago (its server was killed then)."""
    with platform.db.session() as s:
        row = s.get(JobRow, job_id)
        assert row is not None
        row.heartbeat_at = platform.jobs.clock() - timedelta(seconds=seconds)


def test_the_table_is_the_only_judge_of_a_move() -> None:
    for source, target in product(JobStatus, JobStatus):
        if target in TRANSITIONS[source]:
            check_transition("ftjob-x", source, target)
        else:
            with pytest.raises(IllegalTransition):
                check_transition("ftjob-x", source, target)
    assert not TRANSITIONS[JobStatus.SUCCEEDED] and not TRANSITIONS[JobStatus.CANCELLED]


def test_the_store_refuses_illegal_moves_and_changes_nothing(loaded_platform: Platform) -> None:
    p = loaded_platform
    job_id = new_job(p)
    attempt = p.jobs.claim(job_id)
    assert attempt == 1 and status(p, job_id) is JobStatus.RUNNING
    assert p.jobs.claim(job_id) is None  # a second supervisor gets nothing
    p.jobs.succeed(job_id, attempt, fine_tuned_model="ft:x", trained_tokens=5)
    for illegal in (p.jobs.cancel, p.jobs.pause):
        with pytest.raises(IllegalTransition, match="is succeeded; it cannot become"):
            illegal("default", job_id)
    with pytest.raises(InvalidRequestError, match="not paused"):
        p.jobs.resume("default", job_id)
    with pytest.raises(IllegalTransition):
        p.jobs.fail(job_id, attempt, "training_failed", "late")
    done = p.jobs.get(None, job_id)
    assert done.status is JobStatus.SUCCEEDED and done.error is None and done.fine_tuned_model == "ft:x"


def test_a_worker_of_an_older_attempt_changes_nothing(loaded_platform: Platform) -> None:
    p = loaded_platform
    job_id = new_job(p)
    first = p.jobs.claim(job_id)
    assert first is not None
    assert p.jobs.settle_stopped(job_id, "its worker went silent")  # another supervisor settled it
    second = p.jobs.claim(job_id)
    assert second == first + 1
    assert p.jobs.heartbeat(job_id, first) == StopRequest.LOST
    with pytest.raises(IllegalTransition):
        p.jobs.fail(job_id, first, "training_failed", "the old worker's last words")
    p.jobs.record_metrics(job_id, {"step": 1, "train_loss": 0.5})
    with pytest.raises(IllegalTransition):
        p.jobs.succeed(job_id, first, fine_tuned_model="ft:old", trained_tokens=1)
    assert p.files.list("default", purpose="fine-tune-results")[0] == []  # no result file for the lost run
    assert not p.jobs.settle_stopped(job_id, "the old supervisor reaps", attempt=first)
    assert status(p, job_id) is JobStatus.RUNNING and p.jobs.heartbeat(job_id, second) is None


def test_a_second_server_leaves_the_first_ones_jobs_alone(
    loaded_platform: Platform, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    """Two supervisors on one database. The second settles only the job whose worker fell
    silent (its server died); the job the first still runs, heartbeating, it leaves alone."""
    p = loaded_platform
    dead = supervisor(p, sleepers, jobs=1)
    orphan = new_job(p)
    dead.tick()
    assert dead.running == [orphan]
    sleepers[-1].kill()  # its server is killed, and its worker with it
    first = supervisor(p, sleepers, jobs=1)
    live = new_job(p)
    first.tick()
    assert first.running == [live]
    age_heartbeat(p, orphan, 60)
    assert p.jobs.heartbeat(live, 1) is None  # the live worker beats

    second = supervisor(p, sleepers)
    second.tick()  # what a server starting beside the first does at once
    assert second.running == [orphan]
    assert p.jobs.get(None, orphan).attempts == 2 and status(p, orphan) is JobStatus.RUNNING
    assert status(p, live) is JobStatus.RUNNING and p.jobs.get(None, live).attempts == 1
    assert p.jobs.heartbeat(live, 1) is None  # still the first server's run
    messages = [e["message"] for e in p.jobs.events("default", orphan, limit=50)[0]]
    assert any("stopped answering" in m for m in messages)

    first.tick()
    assert first.running == [live]  # nothing of the first's was touched


def test_a_restarted_server_waits_for_silence_before_resuming(
    loaded_platform: Platform, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    p = loaded_platform
    job_id = new_job(p)
    assert p.jobs.claim(job_id) == 1  # left running by a server that was just killed
    restarted = supervisor(p, sleepers)
    restarted.tick()
    assert status(p, job_id) is JobStatus.RUNNING and restarted.running == []  # it may still be alive
    age_heartbeat(p, job_id, 31)
    restarted.tick()
    assert restarted.running == [job_id] and p.jobs.get(None, job_id).attempts == 2


def test_cancel_and_pause_of_running_jobs_are_carried_out_by_the_supervisor(
    loaded_platform: Platform, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    p = loaded_platform
    sup = supervisor(p, sleepers)
    cancelled, paused = new_job(p), new_job(p)
    sup.tick()
    assert p.jobs.cancel("default", cancelled).status is JobStatus.RUNNING  # asked, not yet done
    assert p.jobs.pause("default", paused).status is JobStatus.RUNNING
    deadline = time.monotonic() + 10
    while sup.running:  # the workers are terminated, then reaped
        assert time.monotonic() < deadline, sup.running
        sup.tick()
        time.sleep(0.05)
    assert status(p, cancelled) is JobStatus.CANCELLED and status(p, paused) is JobStatus.PAUSED
    assert p.jobs.get(None, cancelled).finished_at is not None
    assert p.jobs.get(None, paused).control is None
    assert p.jobs.resume("default", paused).status is JobStatus.QUEUED
    sup.tick()
    assert sup.running == [paused] and p.jobs.get(None, paused).attempts == 2


def test_a_disabled_tenants_queued_jobs_do_not_start(
    loaded_platform: Platform, sleepers: list[subprocess.Popen[bytes]]
) -> None:
    p = loaded_platform
    p.tenants.create("acme")
    blocked, other = new_job(p, "acme"), new_job(p)
    p.tenants.update("acme", disabled=True)
    sup = supervisor(p, sleepers)
    sup.tick()
    assert sup.running == [other]
    assert status(p, blocked) is JobStatus.QUEUED
    p.tenants.update("acme", disabled=False)
    sup.tick()
    assert sorted(sup.running) == sorted([blocked, other])
