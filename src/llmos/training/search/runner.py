"""The search runner: a thread in the server that drives each search it holds, a tick at a time.

A tick of a search: each running trial's job is read (its validation reports become the trial's
intermediate values; the pruner may stop it, which cancels the job; its end completes or fails
the trial), new trials are asked of the sampler and created as ordinary fine-tuning jobs while
the search's parallelism and budget allow, and a search with nothing left to run is finished
with its results. The job supervisor runs the jobs within their tenant's concurrency and quota.
All state is in the database (the search row, Optuna's study, the jobs), so a runner that
restarts, or another server's, carries on where the last one stopped."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from optuna.study import Study
from optuna.trial import FrozenTrial, Trial, TrialState

from llmos.errors import LLMOSError
from llmos.kernel.job_status import TERMINAL, JobStatus
from llmos.kernel.jobs import Job, JobStore
from llmos.kernel.leases import STALE_AFTER
from llmos.registry.service import ModelRegistry
from llmos.training.search import study as studies
from llmos.training.search.results import write_results
from llmos.training.search.service import SearchService
from llmos.training.search.space import apply_point
from llmos.training.search.store import Search, SearchStatus

log = logging.getLogger(__name__)


class SearchRunner:
    def __init__(
        self,
        searches: SearchService,
        jobs: JobStore,
        registry: ModelRegistry,
        *,
        owner: str | None = None,
        stale_after: timedelta = STALE_AFTER,
        interval_s: float = 1.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.searches, self.jobs, self.registry = searches, jobs, registry
        self.owner = owner or f"runner-{uuid.uuid4().hex[:12]}"
        self.stale_after, self.interval_s, self.clock = stale_after, interval_s, clock
        self._held: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="search-runner", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop driving; held searches are released for the next runner (their jobs go on)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        for search_id in list(self._held):
            self.searches.store.release(self.owner, search_id)
        self._held.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the runner must outlive any single bad tick
                log.exception("search runner tick failed")
            self._stop.wait(self.interval_s)

    def tick(self) -> None:
        store = self.searches.store
        self._held.update(s.id for s in store.claim(self.owner, self.stale_after))
        held = store.beat(self.owner, list(self._held))
        self._held = set(held)
        for search in held.values():
            try:
                self.drive(search)
            except Exception:  # one search's trouble (a busy database) must not stop the others
                log.exception("search %s: tick failed", search.id)

    # -- one search ------------------------------------------------------------------------
    def drive(self, search: Search) -> None:
        request = search.request
        study = studies.load(self.searches.storage, search.id, request)
        stopping = self._stopping(search)
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self._follow(search, study, trial, stopping)
        asked = study.get_trials(deepcopy=False)
        running = sum(t.state is TrialState.RUNNING for t in asked)
        while stopping is None and running < request.parallelism and len(asked) < request.max_trials:
            self._start_trial(search, study)
            asked, running = study.get_trials(deepcopy=False), running + 1
        if running == 0 and (stopping is not None or len(asked) >= request.max_trials):
            self._finish(search, study)

    def _stopping(self, search: Search) -> str | None:
        if search.status is SearchStatus.CANCELLING:
            return "the search was cancelled"
        wall = search.request.max_wall_seconds
        if wall is not None and self.clock() - search.created_at >= timedelta(seconds=wall):
            return "the search's wall-time budget was spent"
        return None

    def _start_trial(self, search: Search, study: Study) -> None:
        self._create_job(search, study, study.ask(fixed_distributions=search.request.search_space.distributions))

    def _create_job(self, search: Search, study: Study, trial: Trial) -> Job | None:
        """The trial's job (recorded as its user attribute): the search's job body with the
        trial's point placed. Its idempotency key makes a second call (after a restart between
        asking and recording) find the first job. None: the job was refused, the trial failed."""
        body = apply_point(search.request.template, trial.params)
        body["suffix"] = f"{(body.get('suffix') or 'search')[:32]}-t{trial.number}"
        body["metadata"] = {"search_id": search.id, "search_trial": str(trial.number)}
        try:
            job = self.jobs.create(
                tenant=search.tenant,
                key_id=search.key_id,
                body=body,
                idempotency_key=f"{search.id}-trial-{trial.number}",
            )
        except LLMOSError as exc:  # e.g. its training file deleted since: the trial fails, the search goes on
            log.warning("search %s: trial %d's job was refused: %s", search.id, trial.number, exc.message)
            trial.set_user_attr("note", f"its job was refused: {exc.message}"[:500])
            study.tell(trial.number, state=TrialState.FAIL)
            return None
        trial.set_user_attr(studies.JOB_ATTR, job.id)
        return job

    def _follow(self, search: Search, study: Study, frozen: FrozenTrial, stopping: str | None) -> None:
        trial = Trial(study, frozen._trial_id)  # Optuna names a stored trial by its private id only
        job_id = frozen.user_attrs.get(studies.JOB_ATTR)
        if job_id is None:  # asked, but the runner stopped before recording its job
            created = self._create_job(search, study, trial)
            if created is None:
                return
            job_id = created.id
        job = self.jobs.get(None, str(job_id))
        reported: dict[int, float] = {}
        for epoch, value in self.jobs.validation_values(job.id, search.request.metric):
            reported.setdefault(epoch, value)  # a resumed epoch may report again: its first report counts
        new = [(epoch, value) for epoch, value in reported.items() if epoch not in frozen.intermediate_values]
        for epoch, value in new:
            trial.report(value, epoch)
        if job.status in TERMINAL:
            self._settle(search, study, trial, job)
        elif stopping is not None:
            if self._cancel(job):
                trial.set_user_attr("note", stopping)
                state = TrialState.PRUNED if reported else TrialState.FAIL
                study.tell(frozen.number, state=state)
        elif new and trial.should_prune() and self._cancel(job):
            epoch, value = new[-1]
            trial.set_user_attr("note", f"pruned after epoch {epoch} ({search.request.metric}={value:.4f})")
            study.tell(frozen.number, state=TrialState.PRUNED)
            self.jobs.add_event(job.id, f"Pruned by search {search.id} after epoch {epoch}")

    def _settle(self, search: Search, study: Study, trial: Trial, job: Job) -> None:
        """A trial whose job ended: its value is the objective metric of the model the job registered."""
        value = self._objective(job, search.request.metric) if job.status is JobStatus.SUCCEEDED else None
        if value is None:
            reason = (job.error or {}).get("message") or f"its job was {job.status.value}"
            trial.set_user_attr("note", str(reason)[:500])
            study.tell(trial.number, state=TrialState.FAIL)
            return
        trial.set_user_attr("fine_tuned_model", job.fine_tuned_model)
        study.tell(trial.number, value)

    def _objective(self, job: Job, metric: str) -> float | None:
        if job.fine_tuned_model is None:
            return None
        metrics = self.registry.get(job.fine_tuned_model).extra.get("metrics") or {}
        value = metrics.get(metric)
        return float(value) if isinstance(value, int | float) else None

    def _cancel(self, job: Job) -> bool:
        """Stop a trial's job; False if it ended meanwhile (the next tick reads how)."""
        if job.status in TERMINAL:
            return False
        try:
            self.jobs.cancel(job.tenant, job.id)
        except LLMOSError:
            return False
        return True

    def _finish(self, search: Search, study: Study) -> None:
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state is TrialState.COMPLETE]
        best = None
        if complete:
            top = study.best_trial
            best = {
                "number": top.number,
                "value": top.value,
                "params": top.params,
                "fine_tuning_job_id": top.user_attrs.get(studies.JOB_ATTR),
                "fine_tuned_model": top.user_attrs.get("fine_tuned_model"),
            }
        files = write_results(self.searches.files, search, study, trials)
        error = None
        if search.status is SearchStatus.CANCELLING:
            status = SearchStatus.CANCELLED
        elif complete:
            status = SearchStatus.SUCCEEDED
        else:
            status = SearchStatus.FAILED
            error = {"code": "no_trial_completed", "param": None, "message": "no trial of the search completed"}
        if self.searches.store.finish(search.id, self.owner, status, best=best, result_files=files, error=error):
            self._held.discard(search.id)
