"""Long registry work (pulls, exports) as operations: run on a background thread, their progress
kept for callers to follow (stage, bytes, outcome), a cancel flag checked at every progress report.

Operations live in the serving process's memory: a restart forgets them, and work that was
running leaves nothing behind (each kind of work cleans up after itself when it fails).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from llmos.errors import LLMOSError, NotFoundError, RateLimitError
from llmos.registry.sources import Progress

OperationStatus = Literal["running", "succeeded", "failed", "cancelled"]
FINISHED_KEPT = 100  # finished operations remembered for callers that follow them late


class OperationCancelled(Exception):
    """Raised inside the working thread at its next progress report once cancel was asked."""


@dataclass
class Operation:
    id: str
    ref: str
    tenant: str
    status: OperationStatus = "running"
    stage: str = "starting"
    stages: list[str] = field(default_factory=list)
    total_bytes: int | None = None
    done_bytes: int = 0
    error: dict[str, Any] | None = None
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    revision: int = 0
    """Grows with every change, so a follower sends only what changed."""
    cancel_requested: threading.Event = field(default_factory=threading.Event)

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "stage": self.stage,
            "stages": list(self.stages),
            "total_bytes": self.total_bytes,
            "done_bytes": self.done_bytes,
            "error": self.error,
            "created_at": int(self.created_at),
            "finished_at": int(self.finished_at) if self.finished_at else None,
        }

    @property
    def finished(self) -> bool:
        return self.status != "running"

    def succeed(self, **result: Any) -> None:
        """Record what the work produced (called under the operations' lock when it succeeds)."""


OpT = TypeVar("OpT", bound=Operation)
Work = Callable[[Progress], dict[str, Any]]
"""The work of one operation: reports through the progress it is given, returns its result."""


class _Reporter(Progress):
    def __init__(self, operations: Operations[Any], op: Operation) -> None:
        self._operations = operations
        self._op = op

    def stage(self, description: str, total: int | None = None) -> None:
        def change(op: Operation) -> None:
            op.stage, op.total_bytes, op.done_bytes = description, total, 0
            op.stages.append(description)

        self._operations._update(self._op, change)

    def advance(self, amount: int) -> None:
        def change(op: Operation) -> None:
            op.done_bytes += amount

        self._operations._update(self._op, change)


class Operations(Generic[OpT]):
    """Starts, lists, follows and cancels operations of one kind; at most ``max_running`` at once.
    ``kind`` names them in messages ("model pull"), ``prefix`` starts their ids ("pull")."""

    def __init__(self, *, kind: str, prefix: str, max_running: int) -> None:
        self._kind = kind
        self._prefix = prefix
        self._max_running = max_running
        self._ops: OrderedDict[str, OpT] = OrderedDict()
        self._threads: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()

    def new_id(self) -> str:
        return f"{self._prefix}-{uuid.uuid4().hex[:16]}"

    def launch(self, op: OpT, work: Work) -> OpT:
        """Run ``work`` for ``op`` on a thread of its own; 429 when ``max_running`` already run."""
        with self._lock:
            if sum(not o.finished for o in self._ops.values()) >= self._max_running:
                raise RateLimitError(
                    f"{self._max_running} {self._kind}s are running; wait for one to finish",
                    code=f"too_many_{self._prefix}s",
                )
            self._ops[op.id] = op
            self._forget_old()
        thread = threading.Thread(target=self._run, args=(op, work), name=f"{self._kind} {op.ref}", daemon=True)
        self._threads[op.id] = thread
        thread.start()
        return op

    def get(self, op_id: str, *, tenant: str | None) -> OpT:
        """With ``tenant``, another tenant's operation does not exist (404)."""
        with self._lock:
            op = self._ops.get(op_id)
        if op is None or (tenant is not None and op.tenant != tenant):
            raise NotFoundError(f"no {self._kind} {op_id!r}", param=f"{self._prefix}_id")
        return op

    def list(self, *, tenant: str | None) -> list[OpT]:
        with self._lock:
            return [op for op in reversed(self._ops.values()) if tenant is None or op.tenant == tenant]

    def cancel(self, op_id: str, *, tenant: str | None) -> OpT:
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
    def _run(self, op: OpT, work: Work) -> None:
        result: dict[str, Any] = {}
        try:
            result = work(_Reporter(self, op))
            status, error = "succeeded", None
        except OperationCancelled:
            status, error = "cancelled", None
        except LLMOSError as exc:
            status, error = "failed", exc.to_dict()["error"]
        except Exception as exc:  # the work's own failure: reported on the operation, not lost in a thread
            status = "failed"
            error = {"message": str(exc), "type": "server_error", "param": None, "code": f"{self._prefix}_failed"}

        def finish(o: OpT) -> None:
            o.status, o.error = status, error  # type: ignore[assignment]
            if status == "succeeded":
                o.succeed(**result)
            o.stage = o.status
            o.finished_at = time.time()

        self._update(op, finish, check_cancel=False)
        self._threads.pop(op.id, None)

    def _update(self, op: OpT, change: Callable[[OpT], None], *, check_cancel: bool = True) -> None:
        if check_cancel and op.cancel_requested.is_set():
            raise OperationCancelled
        with self._lock:
            change(op)
            op.revision += 1

    def _forget_old(self) -> None:
        finished = [op_id for op_id, op in self._ops.items() if op.finished]
        for op_id in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            del self._ops[op_id]
