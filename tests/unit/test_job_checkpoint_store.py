"""Fine-tuning jobs' checkpoints in the artifact store (issue 21): recorded only whole and only by the
attempt holding the job, counted as blob references, restored into any node's work directory; and a
job whose node died resumes on another node, with a home of its own, from an S3 bucket (moto's server)."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from llmos.config import Settings
from llmos.errors import ArtifactError
from llmos.kernel.job_status import JobStatus
from llmos.platform import Platform
from llmos.registry.gc import referenced
from llmos.registry.store import ArtifactStore, sha256_file
from llmos.registry.tables import JobCheckpointFileRow, JobCheckpointRow
from llmos.training import worker
from tests.fine_tune_jobs import running_job, upload_chat_file

THREE_EPOCHS = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 4}}}


def _checkpoint_dir(root: Path, epoch: int) -> Path:
    """A checkpoint as the training loop leaves it: state files and the servable copy."""
    directory = root / f"ckpt-epoch-{epoch}"
    (directory / "model").mkdir(parents=True)
    (directory / "trainable.safetensors").write_bytes(f"weights of epoch {epoch}".encode())
    (directory / "trainer_state.json").write_text(json.dumps({"epoch": epoch}))
    (directory / "model" / "config.json").write_text("{}")
    return directory


def _rows(platform: Platform, job_id: str) -> list[tuple[int, dict[str, str]]]:
    with platform.db.session() as s:
        rows = s.query(JobCheckpointRow).filter_by(job_id=job_id).order_by(JobCheckpointRow.epoch).all()
        return [
            (
                row.epoch,
                {f.path: f.sha256 for f in s.query(JobCheckpointFileRow).filter_by(checkpoint_id=row.id)},
            )
            for row in rows
        ]


class _Crash(BaseException):
    """The worker's process dying (its node lost) in the middle of something."""


def test_a_checkpoint_is_stored_whole_referenced_and_restored_elsewhere(
    loaded_platform: Platform, tmp_path: Path
) -> None:
    p = loaded_platform
    job_id = running_job(p)
    checkpoints = p.jobs.stored_checkpoints
    assert checkpoints.latest_epoch(job_id) is None
    written = _checkpoint_dir(tmp_path / "node-a", 1)
    assert checkpoints.record(
        job_id, 1, step=4, epoch=1, metrics={"train_loss": 0.5}, directory=written, leave_out=("model",)
    )
    ((epoch, files),) = _rows(p, job_id)
    assert epoch == 1 and sorted(files) == ["trainable.safetensors", "trainer_state.json"]  # no servable copy
    assert referenced(p.db, files.values()) == set(files.values())  # blob collection keeps them
    assert checkpoints.latest_epoch(job_id) == 1
    assert "Checkpoint saved at step 4 (epoch 1)" in [e["message"] for e in p.jobs.events("default", job_id)[0]]

    target = tmp_path / "node-b" / "ckpt-epoch-1"
    target.mkdir(parents=True)
    (target / "stale.bin").write_bytes(b"left by an older attempt on this node")
    restored = checkpoints.restore(job_id, 1, target)
    assert sorted(f.name for f in restored.iterdir()) == ["trainable.safetensors", "trainer_state.json"]
    assert (restored / "trainable.safetensors").read_bytes() == b"weights of epoch 1"


def test_a_local_store_keeps_each_checkpoint_file_once_on_disk(loaded_platform: Platform, tmp_path: Path) -> None:
    """With the store on this disk, a checkpoint's blobs are its work directory's files themselves
    (hard links), not copies: its bytes are written once."""
    p = loaded_platform
    job_id, _, written = _epoch_one_recorded(p, tmp_path)
    ((_, files),) = _rows(p, job_id)
    for rel, digest in files.items():
        blob, local = p.registry.store.local_path(digest).stat(), (written / rel).stat()
        assert (blob.st_dev, blob.st_ino) == (local.st_dev, local.st_ino), rel
        assert sha256_file(p.registry.store.local_path(digest)) == digest  # still named by its content


def test_a_checkpoint_damaged_in_place_is_refused_on_restore(loaded_platform: Platform, tmp_path: Path) -> None:
    """One copy on disk means a file damaged in place is damaged in the store too: a restore finds
    the damage by the recorded digest and refuses it, instead of resuming from it."""
    p = loaded_platform
    job_id, _, written = _epoch_one_recorded(p, tmp_path)
    with (written / "trainable.safetensors").open("r+b") as f:
        f.write(b"W")  # a byte changed where it lies: the blob shares the file
    elsewhere = tmp_path / "node-b" / "ckpt-epoch-1"
    with pytest.raises(ArtifactError, match=r"corrupt in the artifact store: trainable\.safetensors") as caught:
        p.jobs.stored_checkpoints.restore(job_id, 1, elsewhere)
    assert caught.value.code == "hash_mismatch"
    assert not elsewhere.exists() and not elsewhere.with_name("ckpt-epoch-1.restoring").exists()


def test_a_crash_mid_upload_leaves_the_last_complete_checkpoint_the_latest(
    loaded_platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = loaded_platform
    job_id = running_job(p)
    checkpoints = p.jobs.stored_checkpoints
    assert checkpoints.record(job_id, 1, step=4, epoch=1, metrics={}, directory=_checkpoint_dir(tmp_path, 1))
    second = _checkpoint_dir(tmp_path, 2)
    store_type = type(p.registry.store)
    real_adopt = store_type.adopt_file
    uploads: list[Path] = []

    def dying_adopt(store: ArtifactStore, src: Path, **kwargs: Any) -> str:
        uploads.append(src)
        if len(uploads) == 2:  # the second file of the checkpoint: one blob is up, the rest never will be
            raise _Crash
        return real_adopt(store, src, **kwargs)

    monkeypatch.setattr(store_type, "adopt_file", dying_adopt)
    with pytest.raises(_Crash):
        checkpoints.record(job_id, 1, step=8, epoch=2, metrics={}, directory=second)
    assert len(uploads) == 2
    assert [epoch for epoch, _ in _rows(p, job_id)] == [1]
    assert checkpoints.latest_epoch(job_id) == 1


def test_a_worker_that_lost_its_job_records_no_checkpoint(loaded_platform: Platform, tmp_path: Path) -> None:
    p = loaded_platform
    job_id = running_job(p)
    assert p.jobs.settle_stopped(job_id, "its worker went silent")
    assert p.jobs.claim(job_id) == 2
    events = p.jobs.events("default", job_id, limit=100)[0]
    directory = _checkpoint_dir(tmp_path, 1)
    digest = sha256_file(directory / "trainable.safetensors")
    assert not p.jobs.stored_checkpoints.record(job_id, 1, step=4, epoch=1, metrics={}, directory=directory)
    assert _rows(p, job_id) == [] and p.jobs.stored_checkpoints.latest_epoch(job_id) is None
    assert p.jobs.events("default", job_id, limit=100)[0] == events
    assert not p.registry.store.exists(digest)  # its blobs, referred to by nothing, are gone again


# -- on the node that wrote them, and for jobs paused before the store kept checkpoints ---------------------
def _stored(platform: Platform, job_id: str, work_dir: Path) -> Any:
    from llmos.training.job_training import StoredCheckpoints  # imports torch: only these tests need it

    return StoredCheckpoints(platform.jobs.stored_checkpoints, job_id, work_dir)


def test_a_job_paused_before_the_upgrade_resumes_from_its_local_checkpoints(
    loaded_platform: Platform, tmp_path: Path
) -> None:
    """Its checkpoints have rows (listed by the API) but no files in the store: the work directory's
    complete ones count, as they did before."""
    p = loaded_platform
    job_id = running_job(p)
    work_dir = tmp_path / "jobs" / job_id
    for epoch in (1, 2):
        _checkpoint_dir(work_dir, epoch)
        with p.db.session() as s:
            s.add(
                JobCheckpointRow(
                    id=f"ftckpt-old{epoch}",
                    job_id=job_id,
                    step=4 * epoch,
                    epoch=epoch,
                    metrics={},
                    path=str(work_dir / f"ckpt-epoch-{epoch}"),
                    created_at=datetime.now(UTC),
                )
            )
    (work_dir / "ckpt-epoch-3.tmp").mkdir()  # an unfinished one never counts
    source = _stored(p, job_id, work_dir)
    assert source.latest_epoch() == 2
    assert source.fetch(2) == work_dir / "ckpt-epoch-2"
    assert (work_dir / "ckpt-epoch-2" / "trainable.safetensors").read_bytes() == b"weights of epoch 2"
    assert source.fetch(1) == work_dir / "ckpt-epoch-1"  # keep-best's earlier epoch too


def _epoch_one_recorded(p: Platform, tmp_path: Path) -> tuple[str, Path, Path]:
    """A running job whose epoch 1 was written in its work directory and recorded in the store:
    the job, its work directory and that checkpoint's directory."""
    job_id = running_job(p)
    work_dir = tmp_path / "jobs" / job_id
    written = _checkpoint_dir(work_dir, 1)
    assert p.jobs.stored_checkpoints.record(
        job_id, 1, step=4, epoch=1, metrics={}, directory=written, leave_out=("model",)
    )
    return job_id, work_dir, written


def test_a_resume_on_the_node_that_wrote_the_checkpoint_reads_nothing_from_the_store(
    loaded_platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = loaded_platform
    job_id, work_dir, written = _epoch_one_recorded(p, tmp_path)

    def no_reads(store: ArtifactStore, digest: str) -> Path:
        raise AssertionError(f"read {digest} from the store")

    monkeypatch.setattr(type(p.registry.store), "local_path", no_reads)
    source = _stored(p, job_id, work_dir)
    assert source.latest_epoch() == 1
    assert source.fetch(1) == written
    assert (written / "trainable.safetensors").read_bytes() == b"weights of epoch 1"
    assert (written / "model" / "config.json").is_file()  # the servable copy stays where it was


def test_a_local_copy_that_is_not_the_recorded_file_is_replaced_from_the_store(
    loaded_platform: Platform, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = loaded_platform
    job_id, work_dir, written = _epoch_one_recorded(p, tmp_path)
    # Another file in its place (a later attempt's), not the recorded one changed where it lies:
    # with the store on this disk, that one is the blob itself (see the test above).
    (written / "trainable.safetensors").unlink()
    (written / "trainable.safetensors").write_bytes(b"left by another attempt")
    store_type = type(p.registry.store)
    real_local_path = store_type.local_path
    reads: list[str] = []

    def counted(store: ArtifactStore, digest: str) -> Path:
        reads.append(digest)
        return real_local_path(store, digest)

    monkeypatch.setattr(store_type, "local_path", counted)
    restored = _stored(p, job_id, work_dir).fetch(1)
    assert (restored / "trainable.safetensors").read_bytes() == b"weights of epoch 1"
    assert json.loads((restored / "trainer_state.json").read_text()) == {"epoch": 1}
    assert reads == [_rows(p, job_id)[0][1]["trainable.safetensors"]]  # only the damaged file was read


def test_a_resume_skips_a_newest_checkpoint_damaged_in_place_for_the_earlier_one(
    loaded_platform: Platform, tmp_path: Path
) -> None:
    """The newest checkpoint's one copy on disk (its blob too) damaged in place: the resume takes
    the epoch before it, and the job's events say which epoch was skipped and why."""
    from llmos.training.checkpoints import latest_restorable

    p = loaded_platform
    job_id, work_dir, _ = _epoch_one_recorded(p, tmp_path)
    second = _checkpoint_dir(work_dir, 2)
    assert p.jobs.stored_checkpoints.record(job_id, 1, step=8, epoch=2, metrics={}, directory=second)
    with (second / "trainable.safetensors").open("r+b") as f:
        f.write(b"W")
    shutil.rmtree(work_dir / "ckpt-epoch-1")  # resumed on another node: epoch 1 comes from the store
    source = _stored(p, job_id, tmp_path / "node-b" / "jobs" / job_id)
    found = latest_restorable(source, lambda m: p.jobs.add_event(job_id, m))
    assert found is not None and found[0] == 1
    assert (found[1] / "trainable.safetensors").read_bytes() == b"weights of epoch 1"
    messages = [e["message"] for e in p.jobs.events("default", job_id)[0]]
    skipped = [m for m in messages if m.startswith("Skipped the checkpoint of epoch 2")]
    assert skipped and "corrupt in the artifact store: trainable.safetensors" in skipped[0]
    assert skipped[0].endswith("trying epoch 1")

    with (tmp_path / "node-b" / "jobs" / job_id / "ckpt-epoch-1" / "trainable.safetensors").open("r+b") as f:
        f.write(b"W")  # now every checkpoint is damaged: the newest one's error, not a fresh start
    with pytest.raises(ArtifactError, match="epoch 2 is corrupt") as caught:
        latest_restorable(_stored(p, job_id, tmp_path / "node-c" / "jobs" / job_id), lambda m: None)
    assert caught.value.code == "hash_mismatch"


# -- across nodes: an S3 bucket, one database, a home for each node ------------------------------------------
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server")

from tests.unit.test_object_store import BUCKET, bucket, s3_endpoint  # noqa: E402, F401


@pytest.fixture
def node_settings(
    tmp_path: Path,
    s3_endpoint: str,  # noqa: F811
    bucket: object,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, Settings]:
    """Two nodes' settings: their own home each, the database and the bucket shared."""
    shared = {
        "database_url": f"sqlite:///{tmp_path / 'shared.db'}",
        "artifact_store": f"s3://{BUCKET}/cluster",
        "s3_endpoint_url": s3_endpoint,
    }
    monkeypatch.setattr(worker, "_die_with_parent", lambda: None)
    return {name: Settings(home=tmp_path / name, **shared) for name in ("node-a", "node-b")}


def _as_worker_on(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment a worker on that node starts with (``job_workers.worker_env``)."""
    monkeypatch.setenv("LLMOS_HOME", str(settings.home))
    monkeypatch.setenv("LLMOS_DATABASE_URL", str(settings.database_url))
    monkeypatch.setenv("LLMOS_ARTIFACT_STORE", settings.artifact_store)
    monkeypatch.setenv("LLMOS_S3_ENDPOINT_URL", str(settings.s3_endpoint_url))


@pytest.mark.slow
def test_a_job_whose_node_died_mid_upload_resumes_on_another_node_from_the_bucket(
    node_settings: dict[str, Settings], tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Node A trains epoch 1, and dies while uploading epoch 2's checkpoint; its home is gone with
    it. Node B, with a home of its own, resumes the job from epoch 1, read from the bucket."""
    a, b = node_settings["node-a"], node_settings["node-b"]
    server = Platform.open(a)
    server.registry.pull(f"file:{tiny_chat_dir}", name="tiny-chat")
    body = {"model": "tiny-chat", "training_file": upload_chat_file(server), "method": THREE_EPOCHS}
    job = server.jobs.create(tenant="default", body=body)
    server.close()

    real_put = ArtifactStore.put_file
    epoch_2_uploads: list[str] = []

    def dying_in_epoch_2(store: ArtifactStore, src: Path, **kwargs: Any) -> str:
        if src.parent.name == "ckpt-epoch-2":
            epoch_2_uploads.append(src.name)
            if len(epoch_2_uploads) == 2:
                raise _Crash  # the node dies after the first of epoch 2's files went up
        return real_put(store, src, **kwargs)

    monkeypatch.setattr(ArtifactStore, "put_file", dying_in_epoch_2)
    _as_worker_on(a, monkeypatch)
    node_b = Platform.open(b)
    assert node_b.jobs.claim(job.id) == 1
    with pytest.raises(_Crash):
        worker.run(job.id, 1)
    monkeypatch.setattr(ArtifactStore, "put_file", real_put)
    assert len(epoch_2_uploads) == 2
    assert node_b.jobs.stored_checkpoints.latest_epoch(job.id) == 1  # epoch 2's is not there
    shutil.rmtree(a.home)  # the node, its disk and its work directory are gone
    assert node_b.jobs.settle_stopped(job.id, "its node was lost", attempt=1, exit_code=-9, max_attempts=3)

    _as_worker_on(b, monkeypatch)
    assert node_b.jobs.claim(job.id) == 2
    assert worker.run(job.id, 2) == 0
    done = node_b.jobs.get(None, job.id)
    assert done.status is JobStatus.SUCCEEDED, done.error
    messages = [e["message"] for e in node_b.jobs.events("default", job.id, limit=200)[0]]
    resumed = [m for m in messages if m.startswith("Resumed from checkpoint")]
    assert resumed and resumed[0].endswith("(epoch 1)")
    assert [epoch for epoch, _ in _rows(node_b, job.id)] == [1, 2, 3]  # each epoch recorded once
    assert (b.home / "jobs" / job.id / "ckpt-epoch-1" / "trainable.safetensors").is_file()  # restored on B
    keys = {o["Key"] for o in bucket_objects(b)}
    for _, files in _rows(node_b, job.id):
        assert all(f"cluster/sha256/{d[:2]}/{d}" in keys for d in files.values())
    node_b.close()


def bucket_objects(settings: Settings) -> list[dict[str, Any]]:
    client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
    return list(client.list_objects_v2(Bucket=BUCKET).get("Contents", []))
