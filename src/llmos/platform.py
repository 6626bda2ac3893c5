"""Wires the layers together: one object the API and CLI hold (settings, database, registry, engine)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmos.config import Settings
from llmos.errors import NotFoundError
from llmos.evals.data import EVALS_PURPOSE, validate_eval_file
from llmos.kernel.jobs import JobStore
from llmos.registry import ModelRegistry
from llmos.registry.completions import CompletionStore
from llmos.registry.db import Database
from llmos.registry.feedback import FeedbackStore
from llmos.registry.files import FileStore
from llmos.registry.object_store import open_artifact_store
from llmos.registry.responses import ResponseStore
from llmos.retrieval.documents import DOCUMENT_PURPOSES
from llmos.retrieval.stores import VectorStores
from llmos.security import KeyStore
from llmos.security.audit import AuditLog
from llmos.security.denied import DeniedRequests
from llmos.security.limits import Limiter, RateLimiter
from llmos.security.private import read_or_create_secret, secure_home
from llmos.security.quotas import TrainingQuota
from llmos.security.shared_limits import DatabaseRateLimiter
from llmos.security.tenants import TenantStore
from llmos.security.usage import UsageLedger
from llmos.training.batches import validate_batch_file
from llmos.training.corpus import CORPUS_PURPOSE, validate_corpus
from llmos.training.datasets import check_training_file

if TYPE_CHECKING:
    from llmos.cluster.view import NodeView
    from llmos.engine.protocol import EngineClient


@dataclass
class Platform:
    settings: Settings
    db: Database
    registry: ModelRegistry
    keys: KeyStore
    tenants: TenantStore
    audit: AuditLog
    usage: UsageLedger
    limiter: Limiter
    files: FileStore
    jobs: JobStore
    completions: CompletionStore
    feedback: FeedbackStore
    vector_stores: VectorStores
    responses: ResponseStore
    _usage_writer: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "usage-writer"))

    @classmethod
    def open(cls, settings: Settings) -> Platform:
        secure_home(settings.home)  # owner-only, looser paths tightened with a warning
        registry = open_registry(settings)
        db = registry.db
        tenants = TenantStore(db)
        completions = CompletionStore(db)
        files = FileStore(
            db,
            registry.store,
            {
                "fine-tune": check_training_file,
                "batch": validate_batch_file,
                EVALS_PURPOSE: validate_eval_file,
                CORPUS_PURPOSE: validate_corpus,
                **DOCUMENT_PURPOSES,
            },
            quota=lambda tenant: storage_allowance(tenants, settings, tenant),
        )
        return cls(
            settings=settings,
            db=db,
            registry=registry,
            keys=KeyStore(db, read_or_create_secret(settings.secret_path)),
            tenants=tenants,
            audit=AuditLog(db, DeniedRequests(settings.denied_requests_per_minute)),
            usage=UsageLedger(db),
            limiter=RateLimiter() if settings.limits_store == "memory" else DatabaseRateLimiter(db),
            files=files,
            jobs=JobStore(
                db,
                files,
                registry,
                pretrain_memory_mb=settings.pretrain_memory_mb,
                job_gpus=settings.ray_job_gpus,
                cluster_nodes=_cluster_nodes if settings.ray_address is not None else None,
            ),
            completions=completions,
            feedback=FeedbackStore(db, completions),
            vector_stores=VectorStores(db, settings.home / "vector_stores"),
            responses=ResponseStore(db),
        )

    @property
    def training_quota(self) -> TrainingQuota:
        return TrainingQuota(self.tenants, self.keys, self.usage)

    def make_engine(self) -> EngineClient:
        from llmos.engine.local import LocalEngine

        if self.settings.ray_address is not None:  # engine replicas as Ray actors (docs/scaling.md)
            from llmos.cluster.engine import RayEngine

            return RayEngine(self.registry, self.settings, local=LocalEngine(self.registry, self.settings))

        return LocalEngine(self.registry, self.settings, on_restart=self._audit_engine_restart)

    def _audit_engine_restart(self, model: str, reason: str, restarted: bool) -> None:
        outcome = "success" if restarted else "failure"
        self.audit.record("engine.restart", outcome=outcome, target=model, detail={"reason": reason[:500]})

    def record_usage(self, **entry: Any) -> None:
        """Write a usage row off the request path (one writer thread keeps rows in order)."""
        self._usage_writer.submit(self.usage.record, **entry)

    def close(self) -> None:
        self._usage_writer.shutdown(wait=True)  # flush pending usage rows
        self.vector_stores.close()
        self.limiter.close()  # the shared limits' queued releases
        self.db.dispose()


def _cluster_nodes() -> list[NodeView]:
    from llmos.cluster.pool import joined_cluster_nodes  # only cluster mode needs Ray

    return joined_cluster_nodes()


def open_registry(settings: Settings) -> ModelRegistry:
    """The model registry on the settings' database and artifact store (an engine replica on a
    cluster node opens just this)."""
    store = open_artifact_store(
        settings.artifact_store,
        local_root=settings.store_dir,
        cache_bytes=settings.s3_cache_mb << 20,
        endpoint_url=settings.s3_endpoint_url,
    )
    return ModelRegistry(Database(settings.db_url), store, settings.home)


def storage_allowance(tenants: TenantStore, settings: Settings, tenant: str) -> int | None:
    """Bytes of files and models ``tenant`` may keep: its own ``storage_bytes`` limit, else the
    ``storage_quota_bytes`` setting (None: unlimited)."""
    try:
        own = tenants.get(tenant).limits.storage_bytes
    except NotFoundError:
        own = None
    return own if own is not None else settings.storage_quota_bytes
