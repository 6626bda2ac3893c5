"""Periodic maintenance of a running server: unreferenced blobs and abandoned temporary files are
collected, denied requests tallied in memory reach the audit log, and audit and usage rows and
stored completions past their retention are deleted. One function does a run (tests call it with their own clock); a
thread repeats it every ``maintenance_interval_s``."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from llmos.registry.gc import collect_garbage

if TYPE_CHECKING:
    from llmos.platform import Platform

log = logging.getLogger(__name__)


def run_maintenance(platform: Platform, *, now: float | None = None) -> dict[str, int]:
    """One run; returns how many of each thing it removed or wrote. ``now`` is epoch seconds."""
    now = time.time() if now is None else now
    settings = platform.settings
    collected = collect_garbage(platform.db, platform.registry.store, grace_s=settings.blob_grace_s, now=now)
    done = {
        "blobs": collected.blobs,
        "staged_files": collected.staged_files,
        "denied_tallies": platform.audit.flush_denied(),
        "audit_rows": 0,
        "usage_rows": 0,
        "stored_completions": 0,
    }
    wall = datetime.fromtimestamp(now, UTC)
    if settings.audit_retention_days:
        done["audit_rows"] = platform.audit.delete_older_than(settings.audit_retention_days, now=wall)
    if settings.usage_retention_days:
        done["usage_rows"] = platform.usage.delete_older_than(settings.usage_retention_days, now=wall)
    if settings.completion_retention_days:
        done["stored_completions"] = platform.completions.delete_older_than(
            settings.completion_retention_days, now=wall
        )
    return done


class MaintenanceLoop:
    """Runs ``task`` every ``interval_s`` seconds on a daemon thread until stopped."""

    def __init__(self, task: Callable[[], object], interval_s: float) -> None:
        self._task = task
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="maintenance", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._task()
            except Exception:  # one failed run (a locked database, a full disk) must not end the loop
                log.exception("maintenance run failed")
