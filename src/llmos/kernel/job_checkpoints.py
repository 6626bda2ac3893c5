"""Fine-tuning jobs' checkpoints in the artifact store, so a job resumes on any node from it (with an
``s3://`` store, from the bucket) rather than from the directory of the node that wrote them.

A worker writes a checkpoint to its local work directory first (``training.checkpoints``, atomic
there), then ``record`` stores each of its files as a content-addressed blob (a local store links
the file in rather than copying it: checkpoint files are never rewritten) and only then writes
the checkpoint's row and its file rows in one transaction. A crash or a failed upload before that
transaction leaves no row: the checkpoint does not exist for a resume, and its blobs, unreferenced,
go at the next collection. Only the attempt holding the job's lease records one, checked in the same
transaction, so a worker that lost its job never adds a checkpoint the next attempt could resume from.

A resume asks for the newest recorded epoch (``latest_epoch``) and lays that checkpoint's files out
in a local directory (``restore``): the files already there whose digests match the record stay (a
resume on the node that wrote them downloads nothing), the others are read through the store and
checked against the record (an S3 store verifies what it downloads). A checkpoint found damaged
(``hash_mismatch``) is skipped by a resume for the newest earlier one that is whole
(``training.checkpoints.latest_restorable``).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from llmos.errors import ArtifactError, NotFoundError
from llmos.kernel.job_status import JobStatus
from llmos.registry.db import Database
from llmos.registry.gc import claiming, collect_unreferenced
from llmos.registry.store import ArtifactStore, sha256_file
from llmos.registry.tables import JobCheckpointFileRow, JobCheckpointRow, JobEventRow, JobRow


class JobCheckpoints:
    def __init__(
        self, db: Database, store: ArtifactStore, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self.db = db
        self.store = store
        self.clock = clock

    def record(
        self,
        job_id: str,
        attempt: int,
        *,
        step: int,
        epoch: int,
        metrics: dict[str, Any],
        directory: Path,
        leave_out: Iterable[str] = (),
    ) -> bool:
        """Store the checkpoint in ``directory`` (its files, but for the sub-directories named in
        ``leave_out``) and record it for ``attempt``. False, and nothing recorded, when the job is no
        longer that attempt's to run."""
        skipped = set(leave_out)
        files = {
            path.relative_to(directory).as_posix(): path
            for path in sorted(directory.rglob("*"))
            if path.is_file() and path.relative_to(directory).parts[0] not in skipped
        }
        digests = {rel: sha256_file(path) for rel, path in files.items()}
        added: set[str] = set()
        try:
            # Claimed first: a blob found stored here stays until the rows below refer to it.
            with claiming(self.db, self.store, digests.values()):
                for rel, path in files.items():
                    if not self.store.exists(digests[rel]):
                        self.store.adopt_file(path, expected_sha256=digests[rel])
                        added.add(digests[rel])
                recorded = self._insert(job_id, attempt, step, epoch, metrics, directory, digests)
        except BaseException:
            collect_unreferenced(self.db, self.store, added)
            raise
        if not recorded:
            collect_unreferenced(self.db, self.store, added)  # those no other checkpoint shares
        return recorded

    def _insert(
        self,
        job_id: str,
        attempt: int,
        step: int,
        epoch: int,
        metrics: dict[str, Any],
        directory: Path,
        digests: dict[str, str],
    ) -> bool:
        now = self.clock()
        with self.db.session() as s:
            # The lease check and the rows in one transaction: the update locks the job's row, so a
            # supervisor settling or re-claiming the job waits for it, or it sees the new attempt.
            mine = (JobRow.id == job_id, JobRow.status == JobStatus.RUNNING, JobRow.attempts == attempt)
            held = s.execute(
                update(JobRow).where(*mine).values(heartbeat_at=now).execution_options(synchronize_session=False)
            )
            if not getattr(held, "rowcount", 0):
                return False
            checkpoint = JobCheckpointRow(
                id=f"ftckpt-{uuid.uuid4().hex[:24]}",
                job_id=job_id,
                step=step,
                epoch=epoch,
                metrics=metrics,
                path=str(directory),
                created_at=now,
            )
            s.add(checkpoint)
            s.flush()  # the checkpoint's row before its files' (their foreign key)
            s.add_all(
                JobCheckpointFileRow(checkpoint_id=checkpoint.id, path=rel, sha256=digest)
                for rel, digest in digests.items()
            )
            s.add(
                JobEventRow(
                    job_id=job_id,
                    created_at=now,
                    level="info",
                    type="message",
                    message=f"Checkpoint saved at step {step} (epoch {epoch})",
                    data=metrics,
                )
            )
        return True

    def latest_epoch(self, job_id: str, before: int | None = None) -> int | None:
        """The newest epoch (earlier than ``before`` when given) a checkpoint of the job is recorded
        for in the store; None: none is."""
        earlier = () if before is None else (JobCheckpointRow.epoch < before,)
        with self.db.session() as s:
            return s.scalar(
                select(JobCheckpointRow.epoch)
                .join(JobCheckpointFileRow, JobCheckpointFileRow.checkpoint_id == JobCheckpointRow.id)
                .where(JobCheckpointRow.job_id == job_id, *earlier)
                .order_by(JobCheckpointRow.epoch.desc())
                .limit(1)
            )

    def has_epoch(self, job_id: str, epoch: int) -> bool:
        """Whether a checkpoint of the job's ``epoch`` is recorded in the store."""
        return bool(self._files(job_id, epoch))

    def restore(self, job_id: str, epoch: int, target: Path) -> Path:
        """Lay out the job's checkpoint of ``epoch`` as the directory ``target``: the recorded files
        ``target`` already holds with the recorded digests are kept, the others (missing, changed, or
        left by another attempt) are read through the store. Files the record does not name go,
        but when every recorded file is there as recorded, ``target`` is left as it is."""
        files = self._files(job_id, epoch)
        if not files:
            raise NotFoundError(f"job {job_id} has no checkpoint of epoch {epoch} in the artifact store")
        local = {rel for rel, digest in files.items() if _holds(target / rel, digest)}
        if len(local) == len(files):
            return target
        partial = target.with_name(target.name + ".restoring")
        shutil.rmtree(partial, ignore_errors=True)
        for rel in local:  # linked, not copied: the replace below drops only the old name
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(target / rel, partial / rel)
        read = {rel: d for rel, d in files.items() if rel not in local}
        self.store.materialize(read, partial)
        # A local store's blob is the very file the job wrote (adopt_file), so a file damaged in
        # place is damaged in the store too: checked here and refused rather than trained on (a
        # resume then takes an earlier epoch). Other stores verify what they download themselves.
        checked = read if self.store.adopts_in_place else {}
        damaged = sorted(rel for rel, digest in checked.items() if not _holds(partial / rel, digest))
        if damaged:
            shutil.rmtree(partial, ignore_errors=True)
            raise ArtifactError(
                f"job {job_id}'s checkpoint of epoch {epoch} is corrupt in the artifact store: {', '.join(damaged)} "
                "no longer hash to the digests recorded",
                code="hash_mismatch",
            )
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        return target

    def _files(self, job_id: str, epoch: int) -> dict[str, str]:
        """The files of the job's newest recorded checkpoint of ``epoch``: relative path -> digest."""
        with self.db.session() as s:
            checkpoint = s.scalar(
                select(JobCheckpointRow.id)
                .join(JobCheckpointFileRow, JobCheckpointFileRow.checkpoint_id == JobCheckpointRow.id)
                .where(JobCheckpointRow.job_id == job_id, JobCheckpointRow.epoch == epoch)
                .order_by(JobCheckpointRow.created_at.desc())
                .limit(1)
            )
            if checkpoint is None:
                return {}
            rows = s.execute(
                select(JobCheckpointFileRow.path, JobCheckpointFileRow.sha256).where(
                    JobCheckpointFileRow.checkpoint_id == checkpoint
                )
            )
            return {path: digest for path, digest in rows}


def _holds(path: Path, digest: str) -> bool:
    """Whether ``path`` is a file whose content has ``digest``."""
    return path.is_file() and not path.is_symlink() and sha256_file(path) == digest
