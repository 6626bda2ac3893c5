"""Runs eval runs in the server: each run is a task on the event loop that answers and grades its
items, recording each graded item as it is done, so a restarted server resumes a run with the
items not yet graded (``RunStore.record`` records an item once).

Several servers on one database take turns: a server grades only the runs it has claimed, renews
its hold on them every tick, and a run whose server stopped renewing (it died) is taken over by
another once ``stale_after`` has passed (``kernel.leases``, as batches are).

Samples and model graders go through the chat endpoint's own service at background priority (the
batch path, ``batches/lines.py``), and ``cosine`` through the embeddings service, each charged to
the key that created the run as usage of kind ``eval``. At most ``eval_concurrency`` items of all
runs are in flight at once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from llmos.api.context import RequestContext
from llmos.api.openai.batches.lines import CHAT, COMPLETIONS, EMBEDDINGS, answer
from llmos.engine.protocol import EngineClient
from llmos.errors import LLMOSError, ServiceUnavailableError
from llmos.evals.grading import grade_item
from llmos.evals.runs import UNFINISHED, Run, RunStatus, RunStore
from llmos.evals.store import Eval, EvalStore
from llmos.kernel.leases import STALE_AFTER, Leases, new_owner
from llmos.platform import Platform
from llmos.registry.eval_tables import EvalRunRow
from llmos.security import ApiKeyInfo

log = logging.getLogger(__name__)
USAGE_KIND = "eval"


class EngineModels:
    """``evals.graders.Models`` (and ``evals.perplexity.Scorer``) on the engine, for one item or
    one report: what it spends, per model."""

    def __init__(self, platform: Platform, engine: EngineClient, key: ApiKeyInfo) -> None:
        self.platform = platform
        self.engine = engine
        self.key = key
        self.usage: dict[str, dict[str, int]] = {}

    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        completion = await self._call(CHAT, body)
        self._spent(str(body["model"]), completion.get("usage") or {})
        return completion

    async def complete(self, body: dict[str, Any]) -> dict[str, Any]:
        """A completions request (perplexity's prompt scoring, ``evals/perplexity.py``)."""
        completion = await self._call(COMPLETIONS, body)
        self._spent(str(body["model"]), completion.get("usage") or {})
        return completion

    async def embed(self, texts: list[str]) -> list[list[float]]:
        model = self.platform.settings.eval_embedding_model
        result = await self._call(EMBEDDINGS, {"model": model, "input": texts})
        self._spent(model, result.get("usage") or {})
        return [row["embedding"] for row in sorted(result["data"], key=lambda r: r["index"])]

    def _spent(self, model: str, usage: dict[str, Any]) -> None:
        total = self.usage.setdefault(model, {"invocation_count": 0, "prompt_tokens": 0, "completion_tokens": 0})
        total["invocation_count"] += 1
        total["prompt_tokens"] += int(usage.get("prompt_tokens") or 0)
        total["completion_tokens"] += int(usage.get("completion_tokens") or 0)

    async def _call(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        platform = self.platform
        while True:
            # Eval requests are not held to the key's per-minute limits (a run is one request of
            # the client's); their tokens are charged as usage of kind ``eval``.
            lease = platform.limiter.admit({})
            ctx = RequestContext(key=self.key, kind=USAGE_KIND, lease=lease, platform=platform)
            try:
                result: dict[str, Any] = await answer(url, body, self.engine, platform.settings, ctx)
                return result
            except ServiceUnavailableError as exc:  # the engine is full: the item waits, it has not failed
                await asyncio.sleep(exc.retry_after)
            finally:
                lease.release()


class EvalRunner:
    def __init__(
        self, platform: Platform, engine: EngineClient, *, stale_after: timedelta = STALE_AFTER, poll_s: float = 1.0
    ) -> None:
        self.platform = platform
        self.engine = engine
        self.runs = RunStore(platform.db)
        self.evals = EvalStore(platform.db)
        self.leases = Leases(platform.db, EvalRunRow, UNFINISHED)
        self.owner = new_owner()
        self.stale_after = stale_after
        self.poll_s = poll_s
        self._slots = asyncio.Semaphore(max(1, platform.settings.eval_concurrency))
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._claims: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Take part in running eval runs: those a stopped server left queued or in progress, and
        those whose server died, at once and then every ``poll_s``."""
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="eval-runner")

    def submit(self, run_id: str) -> None:
        """Claim a run just created and start it, without waiting for the next tick (unless another
        server claimed it first)."""
        claim = asyncio.get_running_loop().create_task(self._claim(run_id), name=f"eval-claim-{run_id}")
        self._claims.add(claim)
        claim.add_done_callback(self._claims.discard)

    def halt(self, run_id: str) -> None:
        """Stop a run this server runs at once (it was cancelled or deleted); its items in flight are dropped."""
        task = self._tasks.get(run_id)
        if task is not None:
            task.cancel()

    async def stop(self) -> None:
        """Stop every run and release it, so that the next server resumes it at once; items in
        flight are graded again there (unrecorded)."""
        claiming = [*self._claims, *([self._loop_task] if self._loop_task is not None else [])]
        for task in claiming:
            task.cancel()
        await asyncio.gather(*claiming, return_exceptions=True)
        held = list(self._tasks)
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for run_id in held:
            await asyncio.to_thread(self.leases.release, self.owner, run_id)

    async def tick(self) -> None:
        """Renew this server's hold on its runs (stopping those taken over or deleted), then claim
        and start the runs nobody runs."""
        held = await asyncio.to_thread(self.leases.beat, self.owner, list(self._tasks))
        for run_id in set(self._tasks) - held:
            log.warning("eval run %s is no longer this server's; stopping it", run_id)
            self.halt(run_id)
        for run_id in await asyncio.to_thread(self.leases.claim, self.owner, self.stale_after):
            self._start(run_id)

    async def _loop(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # the runner must outlive any single bad tick (a database restart)
                log.exception("eval runner tick failed")
            await asyncio.sleep(self.poll_s)

    async def _claim(self, run_id: str) -> None:
        try:
            for claimed in await asyncio.to_thread(self.leases.claim, self.owner, self.stale_after, only=run_id):
                self._start(claimed)
        except Exception:  # the next tick claims it
            log.exception("eval run %s: claiming it failed", run_id)

    def _start(self, run_id: str) -> None:
        if run_id not in self._tasks:
            self._tasks[run_id] = asyncio.get_running_loop().create_task(self._run(run_id), name=f"eval-{run_id}")

    async def wait(self, run_id: str) -> None:
        """Until the run's task has ended (tests, the CLI's follow)."""
        task = self._tasks.get(run_id)
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self, run_id: str) -> None:
        try:
            run = await asyncio.to_thread(self.runs.load, run_id)
            if run is None or run.status not in (RunStatus.QUEUED, RunStatus.IN_PROGRESS):
                return
            try:
                evaluation = await asyncio.to_thread(self.evals.get, run.tenant, run.eval_id)
                key = await asyncio.to_thread(self.platform.keys.get, run.key_id or "")
                run = await asyncio.to_thread(self.runs.start, run)
                await self._grade_all(run, evaluation, key)
                run = await asyncio.to_thread(self.runs.load, run_id) or run
                if run.status is RunStatus.IN_PROGRESS:
                    await asyncio.to_thread(self.runs.finish, run, RunStatus.COMPLETED)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("eval run %s failed", run_id)
                message = exc.message if isinstance(exc, LLMOSError) else "the server had an error running this eval"
                await self._fail(run_id, message)
        finally:
            self._tasks.pop(run_id, None)

    async def _fail(self, run_id: str, message: str) -> None:
        run = await asyncio.to_thread(self.runs.load, run_id)
        if run is None or run.status not in (RunStatus.QUEUED, RunStatus.IN_PROGRESS):
            return
        try:
            await asyncio.to_thread(self.runs.finish, run, RunStatus.FAILED, {"code": "run_failed", "message": message})
        except LLMOSError:  # cancelled or deleted meanwhile
            log.warning("eval run %s: could not be marked failed", run_id)

    async def _grade_all(self, run: Run, evaluation: Eval, key: ApiKeyInfo) -> None:
        done = await asyncio.to_thread(self.runs.graded, run.id)
        in_flight: set[asyncio.Task[None]] = set()
        try:
            for index in range(len(run.items)):
                if index in done:
                    continue
                await self._slots.acquire()
                if await asyncio.to_thread(self.runs.status, run.id) is not RunStatus.IN_PROGRESS:
                    self._slots.release()  # cancelled (by this server or another) or deleted
                    return
                task = asyncio.create_task(self._grade(run, evaluation, key, index))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            while in_flight:
                finished, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_EXCEPTION)
                for task in finished:
                    task.result()  # a failure of the run itself (not of an item) fails the run
        finally:
            for task in in_flight:
                task.cancel()
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _grade(self, run: Run, evaluation: Eval, key: ApiKeyInfo, index: int) -> None:
        try:
            models = EngineModels(self.platform, self.engine, key)
            graded = await grade_item(evaluation.graders, run.generation, run.items[index], models)
            await asyncio.to_thread(
                self.runs.record,
                run,
                index,
                status=graded.status,
                score=graded.score,
                results=graded.results,
                sample=graded.sample,
                usage=models.usage,
            )
        finally:
            self._slots.release()
