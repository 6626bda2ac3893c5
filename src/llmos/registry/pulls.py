"""Pulls as operations: ``ModelRegistry.pull`` run on a background thread, its progress kept for
callers to follow (stage, bytes, outcome) and a cancel flag it checks at every progress report.

The operations live in the serving process's memory (a restart forgets them; a pull that was
running leaves nothing behind: its staging directory and unreferenced blobs are removed as
for any failed pull).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from llmos.errors import LLMOSError, NotFoundError, RateLimitError
from llmos.registry.records import Lineage, ModelRecord
from llmos.registry.service import ModelRegistry
from llmos.registry.sources import Progress

PullStatus = Literal["running", "succeeded", "failed", "cancelled"]
FINISHED_KEPT = 100  # finished operations remembered for callers that follow them late


class PullCancelled(Exception):
    """Raised inside the pulling thread at its next progress report once cancel was asked."""


@dataclass
class PullOperation:
    id: str
    ref: str
    tenant: str
    status: PullStatus = "running"
    stage: str = "starting"
    stages: list[str] = field(default_factory=list)
    total_bytes: int | None = None
    done_bytes: int = 0
    model: str | None = None
    error: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    revision: int = 0
    """Grows with every change, so a follower sends only what changed."""
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "model.pull",
            "ref": self.ref,
            "status": self.status,
            "stage": self.stage,
            "stages": list(self.stages),
            "total_bytes": self.total_bytes,
            "done_bytes": self.done_bytes,
            "model": self.model,
            "error": self.error,
            "created_at": int(self.created_at),
            "finished_at": int(self.finished_at) if self.finished_at else None,
        }

    @property
    def finished(self) -> bool:
        return self.status != "running"


class _Reporter(Progress):
    def __init__(self, operations: PullOperations, op: PullOperation) -> None:
        self._operations = operations
        self._op = op

    def stage(self, description: str, total: int | None = None) -> None:
        def change(op: PullOperation) -> None:
            op.stage, op.total_bytes, op.done_bytes = description, total, 0
            op.stages.append(description)

        self._operations._update(self._op, change)

    def advance(self, amount: int) -> None:
        def change(op: PullOperation) -> None:
            op.done_bytes += amount

        self._operations._update(self._op, change)


class PullOperations:
    """Starts, lists, follows and cancels pulls; at most ``max_running`` at once."""

    def __init__(self, registry: ModelRegistry, *, max_running: int = 2) -> None:
        self._registry = registry
        self._max_running = max_running
        self._ops: OrderedDict[str, PullOperation] = OrderedDict()
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def start(
        self,
        ref: str,
        *,
        tenant: str,
        name: str | None = None,
        lineage: Lineage | None = None,
        description: str | None = None,
        tags: tuple[str, ...] | None = None,
    ) -> PullOperation:
        with self._lock:
            if sum(not op.finished for op in self._ops.values()) >= self._max_running:
                raise RateLimitError(
                    f"{self._max_running} pulls are running; wait for one to finish", code="too_many_pulls"
                )
            op = PullOperation(id=f"pull-{uuid.uuid4().hex[:16]}", ref=ref, tenant=tenant)
            self._ops[op.id] = op
            self._forget_old()
        thread = threading.Thread(
            target=self._run, args=(op, name, lineage, description, tags), name=f"pull {ref}", daemon=True
        )
        self._threads[op.id] = thread
        thread.start()
        return op

    def get(self, op_id: str, *, tenant: str | None) -> PullOperation:
        """With ``tenant``, another tenant's operation does not exist (404)."""
        with self._lock:
            op = self._ops.get(op_id)
        if op is None or (tenant is not None and op.tenant != tenant):
            raise NotFoundError(f"no model pull {op_id!r}", param="pull_id")
        return op

    def list(self, *, tenant: str | None) -> list[PullOperation]:
        with self._lock:
            return [op for op in reversed(self._ops.values()) if tenant is None or op.tenant == tenant]

    def cancel(self, op_id: str, *, tenant: str | None) -> PullOperation:
        op = self.get(op_id, tenant=tenant)
        op.cancel_requested.set()
        return op

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what runs and wait for it to clean up."""
        with self._lock:
            running = [op for op in self._ops.values() if not op.finished]
        for op in running:
            op.cancel_requested.set()
        for op in running:
            thread = self._threads.get(op.id)
            if thread is not None:
                thread.join(timeout)

    # -- internals -------------------------------------------------------------------------
    def _run(
        self,
        op: PullOperation,
        name: str | None,
        lineage: Lineage | None,
        description: str | None,
        tags: tuple[str, ...] | None,
    ) -> None:
        try:
            record: ModelRecord = self._registry.pull(op.ref, name=name, progress=_Reporter(self, op), lineage=lineage)
            if description is not None or tags is not None:
                record = self._registry.describe(record.id, description=description, tags=tags)
            outcome: dict[str, Any] = {"status": "succeeded", "model": f"{record.name}@{record.version}"}
        except PullCancelled:
            outcome = {"status": "cancelled"}
        except LLMOSError as exc:
            outcome = {"status": "failed", **exc.to_dict()}
        except Exception as exc:  # a source's own failure: reported on the operation, not lost in a thread
            outcome = {"status": "failed", "error": {"message": str(exc), "type": "server_error", "param": None}}
            outcome["error"]["code"] = "pull_failed"

        def finish(o: PullOperation) -> None:
            o.status = outcome["status"]
            o.model = outcome.get("model")
            o.error = outcome.get("error")
            o.stage = o.status
            o.finished_at = time.time()

        self._update(op, finish, check_cancel=False)
        self._threads.pop(op.id, None)

    def _update(self, op: PullOperation, change: Any, *, check_cancel: bool = True) -> None:
        if check_cancel and op.cancel_requested.is_set():
            raise PullCancelled
        with self._lock:
            change(op)
            op.revision += 1

    def _forget_old(self) -> None:
        finished = [op_id for op_id, op in self._ops.items() if op.finished]
        for op_id in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            del self._ops[op_id]
