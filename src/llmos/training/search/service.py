"""What the API asks of searches: create, read (with their trials' counts and CPU time), list,
cancel, and the trials table. Optuna's storage on the platform's database is opened on first use."""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from optuna.storages import RDBStorage

from llmos.errors import NotFoundError
from llmos.kernel.jobs import JobStore
from llmos.registry.db import Database
from llmos.registry.files import FileStore
from llmos.registry.service import ModelRegistry
from llmos.training.search import study as studies
from llmos.training.search.store import Search, SearchStore


class SearchService:
    def __init__(self, db: Database, db_url: str, registry: ModelRegistry, files: FileStore, jobs: JobStore) -> None:
        self.store = SearchStore(db, registry, files)
        self.files, self.jobs, self._url = files, jobs, db_url
        self._storage: RDBStorage | None = None
        self._lock = threading.Lock()

    @property
    def storage(self) -> RDBStorage:
        with self._lock:
            if self._storage is None:
                self._storage = studies.open_storage(self._url)
            return self._storage

    def create(self, *, tenant: str, key_id: str | None, body: dict[str, Any], idempotency_key: str | None) -> Search:
        return self.store.create(tenant=tenant, key_id=key_id, body=body, idempotency_key=idempotency_key)

    def public(self, search: Search) -> dict[str, Any]:
        trials = studies.trials(self.storage, search.id)
        cpu = 0.0
        for trial in trials:
            job_id = trial.user_attrs.get(studies.JOB_ATTR)
            if job_id:
                with contextlib.suppress(NotFoundError):  # a deleted job's time is no longer known
                    cpu += self.jobs.get(search.tenant, str(job_id)).cpu_seconds
        return search.public(studies.counts(trials), cpu)

    def trials(self, tenant: str, search_id: str) -> list[dict[str, Any]]:
        search = self.store.get(tenant, search_id)
        return [studies.public_trial(t) for t in studies.trials(self.storage, search.id)]

    def close(self) -> None:
        if self._storage is not None:
            self._storage.engine.dispose()
