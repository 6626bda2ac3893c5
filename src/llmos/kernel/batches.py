"""The durable batch store: the one owner of batches' state (OpenAI's Batches API).

A batch is a job of the kernel that runs in the server process (its lines go through the engine
like interactive requests, at background priority: ``api/openai/batches/runner.py``). Its state
lives here: the batch row, whose status changes only through ``_move`` (legal per
``batch_status`` and a compare-and-set on the status read), and one row per answered line, keyed
by the line, so progress is durable line by line and a line answered again after a crash is
recorded once. A server claims a batch by writing itself as its owner; a batch whose owner's
heartbeat is stale is claimed by the next server that looks (a restart resumes it: ``leases``).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError

from llmos.errors import InvalidRequestError, NotFoundError
from llmos.kernel.batch_status import TERMINAL, TIMESTAMPS, BatchStatus, check_batch_transition
from llmos.kernel.job_requests import check_metadata
from llmos.kernel.leases import Leases
from llmos.registry.db import Database
from llmos.registry.files import FileStore
from llmos.registry.tables import BatchRequestRow, BatchRow
from llmos.training.batches import BATCH_URLS

MAX_LINES = 50_000
MAX_BYTES = 200 * 1024 * 1024
"""OpenAI's limits on one batch's input file."""
WINDOWS = {"24h": timedelta(hours=24)}
OUTPUT_PURPOSE = "batch_output"
UNANSWERED = {
    BatchStatus.CANCELLED: ("batch_cancelled", "This line was not answered: the batch was cancelled."),
    BatchStatus.EXPIRED: ("batch_expired", "This line was not answered within the batch's completion window."),
}


def _stamp(value: datetime) -> int:
    return int((value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp())


@dataclass(frozen=True)
class Batch:
    id: str
    tenant: str
    key_id: str | None
    endpoint: str
    input_file_id: str
    status: BatchStatus
    total: int
    created_at: datetime
    expires_at: datetime
    stamps: dict[str, int]
    metadata: dict[str, str] | None = None
    errors: dict[str, Any] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    completion_window: str = "24h"

    @classmethod
    def from_row(cls, row: BatchRow) -> Batch:
        return cls(
            id=row.id,
            tenant=row.tenant,
            key_id=row.key_id,
            endpoint=row.endpoint,
            input_file_id=row.input_file_id,
            status=BatchStatus(row.status),
            total=row.total,
            created_at=row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC),
            expires_at=row.expires_at if row.expires_at.tzinfo else row.expires_at.replace(tzinfo=UTC),
            stamps=dict(row.stamps or {}),
            metadata=row.batch_metadata,
            errors=row.errors,
            output_file_id=row.output_file_id,
            error_file_id=row.error_file_id,
            completion_window=row.completion_window,
        )

    def public(self, completed: int, failed: int) -> dict[str, Any]:
        """OpenAI's batch object, with ``completed`` and ``failed`` lines so far."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": self.errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.value,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": _stamp(self.created_at),
            "expires_at": _stamp(self.expires_at),
            **{name: self.stamps.get(name) for name in TIMESTAMPS.values()},
            "request_counts": {"total": self.total, "completed": completed, "failed": failed},
            "metadata": self.metadata,
        }


def _batch_id_error(batch_id: str) -> NotFoundError:
    return NotFoundError(f"No such batch: {batch_id[:80]}", param="batch_id")


class BatchStore:
    def __init__(self, db: Database, files: FileStore, clock: Callable[[], datetime] = lambda: datetime.now(UTC)):
        self.db = db
        self.files = files
        self.clock = clock
        unfinished = [status for status in BatchStatus if status not in TERMINAL]
        self.leases = Leases(db, BatchRow, unfinished, clock=lambda: self.clock())

    # -- what the API asks -----------------------------------------------------------------
    def create(self, *, tenant: str, key_id: str | None, body: dict[str, Any]) -> Batch:
        """Check a batch request against its input file and store it (``validating``)."""
        endpoint, window = body.get("endpoint"), body.get("completion_window")
        if endpoint not in BATCH_URLS:
            raise InvalidRequestError(f"endpoint must be one of {sorted(BATCH_URLS)}", param="endpoint")
        if window not in WINDOWS:
            raise InvalidRequestError(f"completion_window must be one of {sorted(WINDOWS)}", param="completion_window")
        if body.get("output_expires_after") is not None:
            raise InvalidRequestError("output_expires_after is not supported", param="output_expires_after")
        metadata = check_metadata(body.get("metadata"))
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise InvalidRequestError("input_file_id must be a file id", param="input_file_id")
        record = self.files.get(tenant, file_id)
        if record.purpose != "batch":
            raise InvalidRequestError(
                f"file {file_id} has purpose {record.purpose!r}; a batch's input file must have purpose 'batch'",
                param="input_file_id",
            )
        if record.status != "processed":
            raise InvalidRequestError(f"file {file_id} is invalid: {record.status_details}", param="input_file_id")
        if record.bytes > MAX_BYTES or record.summary.get("records", 0) > MAX_LINES:
            raise InvalidRequestError(
                f"a batch's input file holds at most {MAX_LINES} lines and {MAX_BYTES} bytes; file {file_id} has "
                f"{record.summary.get('records')} lines and {record.bytes} bytes",
                param="input_file_id",
            )
        urls = record.summary.get("urls", [])
        if urls != [endpoint]:
            raise InvalidRequestError(
                f"every line of the input file must be for the batch's endpoint {endpoint}; it has {urls}",
                param="endpoint",
            )
        now = self.clock()
        row = BatchRow(
            id=f"batch_{uuid.uuid4().hex[:24]}",
            tenant=tenant,
            key_id=key_id,
            endpoint=endpoint,
            input_file_id=record.id,
            input_sha256=record.sha256,
            completion_window=window,
            status=BatchStatus.VALIDATING,
            total=int(record.summary["records"]),
            batch_metadata=metadata,
            created_at=now,
            expires_at=now + WINDOWS[window],
            stamps={},
        )
        with self.db.session() as s:
            s.add(row)
            s.flush()
            return Batch.from_row(row)

    def get(self, tenant: str, batch_id: str) -> Batch:
        with self.db.session() as s:
            row = s.get(BatchRow, batch_id)
            if row is None or row.tenant != tenant:  # another tenant's batch does not exist for you
                raise _batch_id_error(batch_id)
            return Batch.from_row(row)

    def page(self, tenant: str, *, after: str | None = None, limit: int = 20) -> tuple[list[Batch], bool]:
        """Newest first; ``after`` a batch id from an earlier page."""
        with self.db.session() as s:
            q = select(BatchRow).where(BatchRow.tenant == tenant)
            if after is not None:
                cursor = s.get(BatchRow, after)
                if cursor is None or cursor.tenant != tenant:
                    raise InvalidRequestError(f"No such batch: {after[:80]}", param="after")
                q = q.where(
                    or_(
                        BatchRow.created_at < cursor.created_at,
                        (BatchRow.created_at == cursor.created_at) & (BatchRow.id < cursor.id),
                    )
                )
            rows = list(s.scalars(q.order_by(BatchRow.created_at.desc(), BatchRow.id.desc()).limit(limit + 1)))
            return [Batch.from_row(r) for r in rows[:limit]], len(rows) > limit

    def counts(self, batch_ids: list[str]) -> dict[str, tuple[int, int]]:
        """(completed, failed) lines of each batch: answered with a 2xx, or otherwise."""
        out: dict[str, tuple[int, int]] = dict.fromkeys(batch_ids, (0, 0))
        if not batch_ids:
            return out
        ok = BatchRequestRow.status_code < 300
        with self.db.session() as s:
            q = (
                select(BatchRequestRow.batch_id, ok, func.count())
                .where(BatchRequestRow.batch_id.in_(batch_ids))
                .group_by(BatchRequestRow.batch_id, ok)
            )
            for batch_id, succeeded, n in s.execute(q):
                completed, failed = out[batch_id]
                out[batch_id] = (completed + n, failed) if succeeded else (completed, failed + n)
        return out

    def cancel(self, tenant: str, batch_id: str) -> Batch:
        """Ask a batch to stop; its runner stops sending its lines and writes what was answered."""
        batch = self.get(tenant, batch_id)
        if batch.status is BatchStatus.CANCELLING:
            return batch
        return self._move(batch, BatchStatus.CANCELLING)

    # -- what a runner does ----------------------------------------------------------------
    def claim(self, owner: str, stale_after: timedelta) -> list[Batch]:
        """Unfinished batches nobody runs (new, released, or their owner's heartbeat stale), now
        ``owner``'s; a new one moves to ``in_progress``."""
        claimed: list[Batch] = []
        for batch_id in self.leases.claim(owner, stale_after):
            batch = self._get(batch_id)
            if batch.status is BatchStatus.VALIDATING:
                batch = self._move(batch, BatchStatus.IN_PROGRESS)
            claimed.append(batch)
        return claimed

    def beat(self, owner: str, batch_ids: list[str]) -> dict[str, BatchStatus]:
        """Renew ``owner``'s hold on its batches; returns the status of each it still holds."""
        held = self.leases.beat(owner, batch_ids)
        if not held:
            return {}
        with self.db.session() as s:
            rows = s.execute(select(BatchRow.id, BatchRow.status).where(BatchRow.id.in_(held)))
            return {batch_id: BatchStatus(status) for batch_id, status in rows}

    def release(self, owner: str, batch_id: str) -> None:
        """Give a batch up (this server stops): the next server to look resumes it at once."""
        self.leases.release(owner, batch_id)

    def answered(self, batch_id: str) -> set[int]:
        with self.db.session() as s:
            return set(s.scalars(select(BatchRequestRow.line).where(BatchRequestRow.batch_id == batch_id)))

    def record(self, batch_id: str, line: int, custom_id: str, request_id: str, status_code: int, body: Any) -> bool:
        """Record one line's answer; False when the line had been recorded already."""
        try:
            with self.db.session() as s:
                s.add(
                    BatchRequestRow(
                        batch_id=batch_id,
                        line=line,
                        custom_id=custom_id,
                        request_id=request_id,
                        status_code=status_code,
                        body=body,
                    )
                )
        except IntegrityError:
            return False
        return True

    def finish(self, batch_id: str, target: BatchStatus, unsent: dict[int, str]) -> Batch:
        """Write the output and error files and end the batch in ``target`` (``completed`` by way of
        ``finalizing``; ``cancelled`` or ``expired``). ``unsent`` maps the lines never answered to
        their custom ids: they go to the error file as cancelled or expired."""
        batch = self._get(batch_id)
        if target is BatchStatus.COMPLETED and batch.status is BatchStatus.CANCELLING:
            target = BatchStatus.CANCELLED  # cancelled after its last line was answered
        if target is BatchStatus.COMPLETED and batch.status is BatchStatus.IN_PROGRESS:
            batch = self._move(batch, BatchStatus.FINALIZING)
        outputs = self._write(batch, ok=True, unsent={}, target=target)
        errors = self._write(batch, ok=False, unsent=unsent, target=target)
        return self._move(batch, target, output_file_id=outputs, error_file_id=errors)

    def fail(self, batch_id: str, message: str) -> Batch:
        return self._move(self._get(batch_id), BatchStatus.FAILED, errors=_errors("batch_failed", message))

    # -- internals -------------------------------------------------------------------------
    def _get(self, batch_id: str) -> Batch:
        with self.db.session() as s:
            row = s.get(BatchRow, batch_id)
            if row is None:
                raise _batch_id_error(batch_id)
            return Batch.from_row(row)

    def _move(self, batch: Batch, target: BatchStatus, **values: Any) -> Batch:
        check_batch_transition(batch.id, batch.status, target)
        stamps = {**batch.stamps, TIMESTAMPS[target]: _stamp(self.clock())}
        with self.db.session() as s:
            moved = s.execute(
                update(BatchRow)
                .where(BatchRow.id == batch.id, BatchRow.status == batch.status.value)
                .values(status=target.value, stamps=stamps, **values)
            )
            if moved.rowcount != 1:  # type: ignore[attr-defined]
                # Another process moved it first: judge the request against what it is now.
                current = self._get(batch.id)
                check_batch_transition(batch.id, current.status, target)
                return self._move(current, target, **values)
        return self._get(batch.id)

    def _write(self, batch: Batch, *, ok: bool, unsent: dict[int, str], target: BatchStatus) -> str | None:
        """The output file (``ok``: lines answered with a 2xx) or the error file, in line order;
        None when it would be empty. Written idempotently: finishing again (after a crash between
        the file and the status) names the same file."""
        lines = list(self._lines(batch, ok=ok, unsent=unsent if target in UNANSWERED else {}, target=target))
        if not lines:
            return None
        kind = "output" if ok else "error"
        record, _ = self.files.create(
            tenant=batch.tenant,
            purpose=OUTPUT_PURPOSE,
            filename=f"{batch.id}_{kind}.jsonl",
            chunks=iter(lines),
            max_bytes=2**62,
            idempotency_key=f"{batch.id}:{kind}",
            generated=True,
        )
        return record.id

    def _lines(self, batch: Batch, *, ok: bool, unsent: dict[int, str], target: BatchStatus) -> Iterator[bytes]:
        with self.db.session() as s:
            q = select(BatchRequestRow).where(BatchRequestRow.batch_id == batch.id)
            q = q.where(BatchRequestRow.status_code < 300 if ok else BatchRequestRow.status_code >= 300)
            rows = [
                (r.line, _line(batch.id, r.line, r.custom_id, r.request_id, r.status_code, r.body))
                for r in s.scalars(q)
            ]
        if unsent:
            code, message = UNANSWERED[target]
            rows += [
                (line, _unsent_line(batch.id, line, custom_id, code, message)) for line, custom_id in unsent.items()
            ]
        for _, text in sorted(rows):
            yield text


def _line(batch_id: str, line: int, custom_id: str, request_id: str, status_code: int, body: Any) -> bytes:
    response = {"status_code": status_code, "request_id": request_id, "body": body}
    return _jsonl(
        {"id": f"batch_req_{batch_id[6:]}_{line}", "custom_id": custom_id, "response": response, "error": None}
    )


def _unsent_line(batch_id: str, line: int, custom_id: str, code: str, message: str) -> bytes:
    error = {"code": code, "message": message}
    return _jsonl({"id": f"batch_req_{batch_id[6:]}_{line}", "custom_id": custom_id, "response": None, "error": error})


def _jsonl(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def _errors(code: str, message: str) -> dict[str, Any]:
    return {"object": "list", "data": [{"code": code, "message": message, "param": None, "line": None}]}
