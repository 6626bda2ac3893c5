"""Runs batches in the server: claims them from the batch store, sends their lines through the
endpoints' own services at background priority, records each answer as it comes, and writes the
output and error files at the end.

At most ``batch_concurrency`` lines of all batches are in flight at once, and the engine admits
them only into rows interactive requests leave free (``engine.scheduler``), so a batch yields to
interactive clients. A line is recorded once (``BatchStore.record``); a restarted server claims
the batch again and sends only the lines with no answer recorded. A line in flight when its
server stopped is sent again, and only one answer is recorded (see docs/adr/0016).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from itertools import islice
from typing import Any

from llmos.api.context import RequestContext
from llmos.api.errors import error_body
from llmos.api.openai.batches.lines import answer
from llmos.api.openai.common import new_id
from llmos.engine.protocol import EngineClient
from llmos.errors import LLMOSError, NotFoundError, ServiceUnavailableError
from llmos.kernel.batch_status import BatchStatus
from llmos.kernel.batches import Batch, BatchStore
from llmos.kernel.leases import STALE_AFTER, new_owner
from llmos.platform import Platform
from llmos.security import ApiKeyInfo
from llmos.training.datasets import iter_lines, jsonl_objects

log = logging.getLogger(__name__)
_READ_AHEAD = 256
"""Input lines read from disk at a time (off the event loop)."""


class _Running:
    """A batch this server runs: its task, and whether and how it must stop early."""

    def __init__(self, batch: Batch) -> None:
        self.batch = batch
        self.stop: BatchStatus | None = None
        """The state it ends in when told to stop (cancelled, expired)."""
        self.lost = False
        """Another server holds it now: stop without touching it."""
        self.stopped = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def halt(self, reason: BatchStatus | None) -> None:
        """Stop sending lines; ``reason`` None: the batch was lost."""
        if not self.stopped.is_set():
            self.stop, self.lost = reason, reason is None
            self.stopped.set()


class BatchRunner:
    def __init__(
        self, platform: Platform, engine: EngineClient, *, stale_after: timedelta = STALE_AFTER, poll_s: float = 0.5
    ) -> None:
        self.platform = platform
        self.engine = engine
        self.store = BatchStore(platform.db, platform.files)
        self.stale_after = stale_after
        self.poll_s = poll_s
        self.owner = new_owner()
        self._slots = asyncio.Semaphore(platform.settings.batch_concurrency)
        self._running: dict[str, _Running] = {}
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="batch-runner")

    async def stop(self) -> None:
        """Stop sending lines; lines in flight are aborted (a later server sends them again) and
        every batch held is released, so the next server resumes it at once."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        held = list(self._running)  # each task forgets its batch as it ends
        tasks = [r.task for r in self._running.values() if r.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for batch_id in held:
            await asyncio.to_thread(self.store.release, self.owner, batch_id)
        self._running.clear()

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the runner must outlive any single bad tick
                log.exception("batch runner tick failed")
            await asyncio.sleep(self.poll_s)

    async def tick(self) -> None:
        """Renew this server's hold on its batches and tell each whether it must stop (cancelled,
        expired, or taken over), then claim batches nobody runs."""
        held = await asyncio.to_thread(self.store.beat, self.owner, list(self._running))
        now = self.store.clock()
        for batch_id, running in list(self._running.items()):
            status = held.get(batch_id)
            if status is None:
                running.halt(None)  # no longer ours
            elif status is BatchStatus.CANCELLING:
                running.halt(BatchStatus.CANCELLED)
            elif now >= running.batch.expires_at:
                running.halt(BatchStatus.EXPIRED)
        for batch in await asyncio.to_thread(self.store.claim, self.owner, self.stale_after):
            running = _Running(batch)
            self._running[batch.id] = running
            if batch.status is BatchStatus.CANCELLING:
                running.halt(BatchStatus.CANCELLED)
            running.task = asyncio.create_task(self._run(running), name=f"batch-{batch.id}")

    # -- one batch -------------------------------------------------------------------------
    async def _run(self, running: _Running) -> None:
        batch = running.batch
        try:
            await self._send_lines(running)
            if running.lost:
                return
            target = running.stop or BatchStatus.COMPLETED
            unsent = await self._unanswered(batch)
            await asyncio.to_thread(self.store.finish, batch.id, target, unsent)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("batch %s failed", batch.id)
            message = exc.message if isinstance(exc, LLMOSError) else "the server had an error running this batch"
            try:
                await asyncio.to_thread(self.store.fail, batch.id, message)
            except LLMOSError:  # it had ended meanwhile (cancelled, say)
                log.warning("batch %s: could not be marked failed", batch.id)
        finally:
            self._running.pop(batch.id, None)

    async def _send_lines(self, running: _Running) -> None:
        batch = running.batch
        key = await asyncio.to_thread(self._key, batch)
        done = await asyncio.to_thread(self.store.answered, batch.id)
        in_flight: set[asyncio.Task[None]] = set()
        stop_wait = asyncio.ensure_future(running.stopped.wait())
        try:
            async for number, record in self._lines(batch):
                if number in done:
                    continue
                if running.stopped.is_set() or not await self._take_slot(running):
                    break
                task = asyncio.create_task(self._answer(batch, key, number, record))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            while in_flight and not running.stopped.is_set():
                await asyncio.wait([*in_flight, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
            for task in in_flight:
                task.cancel()  # aborts its generation; the line is sent again or reported unanswered
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _take_slot(self, running: _Running) -> bool:
        """True once a line slot is held; False when the batch was told to stop first."""
        slot = asyncio.ensure_future(self._slots.acquire())
        stop = asyncio.ensure_future(running.stopped.wait())
        try:
            await asyncio.wait([slot, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not slot.done():
                slot.cancel()
        if not slot.done() or slot.cancelled():
            return False
        if running.stopped.is_set():
            self._slots.release()
            return False
        return True

    async def _answer(self, batch: Batch, key: ApiKeyInfo, number: int, record: dict[str, Any]) -> None:
        try:
            request_id = new_id("req")
            while True:
                # Batch lines are not held to the key's per-minute limits (OpenAI's batches have their
                # own); their tokens are charged as usage of kind ``batch``.
                lease = self.platform.limiter.admit({})
                ctx = RequestContext(key=key, kind="batch", lease=lease, platform=self.platform)
                try:
                    status, body = (
                        200,
                        await answer(batch.endpoint, record["body"], self.engine, self.platform.settings, ctx),
                    )
                except ServiceUnavailableError as exc:  # the engine is full: the line waits, it has not failed
                    await asyncio.sleep(exc.retry_after)
                    continue
                except LLMOSError as exc:
                    status, body = exc.status_code, exc.to_dict()
                except Exception:
                    log.exception("batch %s line %d", batch.id, number)
                    status = 500
                    body = error_body(
                        "The server had an error while processing your request.", "server_error", None, "internal_error"
                    )
                break
            await asyncio.to_thread(self.store.record, batch.id, number, record["custom_id"], request_id, status, body)
        finally:
            self._slots.release()

    def _key(self, batch: Batch) -> ApiKeyInfo:
        if batch.key_id is None:
            raise NotFoundError("the API key that created this batch is unknown")
        return self.platform.keys.get(batch.key_id)

    async def _lines(self, batch: Batch) -> AsyncIterator[tuple[int, dict[str, Any]]]:
        """The input file's lines, numbered as its upload check numbered them, read off the loop."""
        path = await asyncio.to_thread(self.platform.files.content_path, batch.tenant, batch.input_file_id)
        lines: Iterator[tuple[int, dict[str, Any]]] = jsonl_objects(iter_lines(path))
        try:
            while chunk := await asyncio.to_thread(lambda: list(islice(lines, _READ_AHEAD))):
                for item in chunk:
                    yield item
        finally:
            close = getattr(lines, "close", None)
            if close is not None:
                close()

    async def _unanswered(self, batch: Batch) -> dict[int, str]:
        done = await asyncio.to_thread(self.store.answered, batch.id)
        return {number: record["custom_id"] async for number, record in self._lines(batch) if number not in done}
