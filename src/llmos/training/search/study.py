"""A search's Optuna study, kept in the platform's own database by Optuna's RDB storage: its
sampler and pruner built from the checked request, and its trials as the API shows them."""

from __future__ import annotations

from typing import Any

import optuna
from optuna.pruners import BasePruner, MedianPruner, NopPruner, SuccessiveHalvingPruner
from optuna.samplers import BaseSampler, GridSampler, RandomSampler, TPESampler
from optuna.storages import RDBStorage
from optuna.storages._rdb.models import SCHEMA_VERSION, VersionInfoModel
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.orm import Session

from llmos.errors import LLMOSError
from llmos.kernel.job_record import timestamp
from llmos.training.search.request import SearchRequest

optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials are reported as the platform's own events
JOB_ATTR = "fine_tuning_job_id"
"""The user attribute naming a trial's job: what links a study's trials to the platform's jobs."""


def open_storage(url: str) -> RDBStorage:
    """Optuna's storage on the platform's database: Optuna creates its own tables there.

    ``skip_compatibility_check``: Optuna checks its schema by the revision in ``alembic_version``,
    which in this database is the platform's own migration. The schema version Optuna records in
    its ``version_info`` table is checked here instead."""
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    storage = RDBStorage(url, engine_kwargs=kwargs, skip_compatibility_check=True)
    with Session(storage.engine) as session:
        info = session.query(VersionInfoModel).one_or_none()
    if info is not None and info.schema_version != SCHEMA_VERSION:
        raise LLMOSError(
            f"the database's Optuna tables have schema {info.schema_version} (Optuna {info.library_version}); "
            f"this Optuna {optuna.__version__} needs {SCHEMA_VERSION}. Install the Optuna that created them "
            "(`optuna storage upgrade` must not run on this database: it would move the platform's alembic_version)"
        )
    return storage


class _AskTellGrid(GridSampler):
    """Optuna's grid sampler, minus its call to ``study.stop()`` once the grid is covered: that is
    legal only inside ``study.optimize``, and a search stops at its ``max_trials`` (at most the grid's size)."""

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Any) -> None:
        return None


def sampler(request: SearchRequest, seed: int) -> BaseSampler:
    """The request's sampler, seeded by ``seed`` (the search's seed plus the trials it has asked
    for): a study loaded again after a restart does not repeat its earlier draws."""
    options = request.sampler
    if options["type"] == "grid":
        return _AskTellGrid(request.search_space.grid("search_space"), seed=seed)
    if options["type"] == "random":
        return RandomSampler(seed=seed)
    return TPESampler(n_startup_trials=options["n_startup_trials"], seed=seed)


def pruner(request: SearchRequest) -> BasePruner:
    options = request.pruner
    if options["type"] == "median":
        return MedianPruner(n_startup_trials=options["n_startup_trials"], n_warmup_steps=options["n_warmup_steps"])
    if options["type"] == "successive_halving":
        return SuccessiveHalvingPruner(
            min_resource=options["min_resource"],
            reduction_factor=options["reduction_factor"],
            min_early_stopping_rate=options["min_early_stopping_rate"],
        )
    return NopPruner()


def load(storage: RDBStorage, search_id: str, request: SearchRequest) -> Study:
    """The search's study (created on first use), with a sampler seeded past its asked trials."""
    asked = 0
    try:
        study_id = storage.get_study_id_from_name(search_id)
        asked = storage.get_n_trials(study_id)
    except KeyError:
        pass
    return optuna.create_study(
        storage=storage,
        study_name=search_id,
        sampler=sampler(request, int(request.template["seed"]) + asked),
        pruner=pruner(request),
        direction=StudyDirection.MAXIMIZE if request.direction == "maximize" else StudyDirection.MINIMIZE,
        load_if_exists=True,
    )


def trials(storage: RDBStorage, search_id: str) -> list[FrozenTrial]:
    """The study's trials, oldest first (none before its runner first loads it)."""
    try:
        study_id = storage.get_study_id_from_name(search_id)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False)


def counts(all_trials: list[FrozenTrial]) -> dict[str, int]:
    states = [t.state for t in all_trials]
    return {
        "total": len(states),
        "running": states.count(TrialState.RUNNING),
        "complete": states.count(TrialState.COMPLETE),
        "pruned": states.count(TrialState.PRUNED),
        "failed": states.count(TrialState.FAIL),
    }


def public_trial(trial: FrozenTrial) -> dict[str, Any]:
    """One row of the trials table: its point, state, value, the values reported per epoch, its job."""
    return {
        "object": "fine_tuning.search.trial",
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.value if trial.state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
        "params": trial.params,
        "intermediate_values": {str(step): value for step, value in sorted(trial.intermediate_values.items())},
        "fine_tuning_job_id": trial.user_attrs.get(JOB_ATTR),
        "fine_tuned_model": trial.user_attrs.get("fine_tuned_model"),
        "note": trial.user_attrs.get("note"),
        "started_at": timestamp(trial.datetime_start),
        "finished_at": timestamp(trial.datetime_complete),
    }
