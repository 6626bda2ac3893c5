"""Builds the FastAPI application: routers, error shape, edge limits, lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from fastapi import FastAPI
from fastapi.routing import APIRoute, iter_route_contexts

from llmos import __version__
from llmos.api import health, usage
from llmos.api.admin.alerts import router as alerts_router
from llmos.api.admin.cluster import router as cluster_router
from llmos.api.admin.router import router as admin_router
from llmos.api.aliases import router as aliases_router
from llmos.api.console.pages import console_mount
from llmos.api.console.sessions import ConsoleSessions
from llmos.api.errors import install_error_handlers
from llmos.api.feedback import router as feedback_router
from llmos.api.hosts import HostCheckMiddleware, allowed_hosts_for
from llmos.api.limits import BodyLimitMiddleware
from llmos.api.metrics import router as metrics_router
from llmos.api.model_management.exports import router as exports_router
from llmos.api.model_management.router import router as model_management_router
from llmos.api.openai.batches.lines import check_body
from llmos.api.openai.batches.router import router as batches_router
from llmos.api.openai.batches.runner import BatchRunner
from llmos.api.openai.chat.router import router as chat_router
from llmos.api.openai.chat.stored import router as stored_completions_router
from llmos.api.openai.completions.router import router as completions_router
from llmos.api.openai.embeddings.router import router as embeddings_router
from llmos.api.openai.evals.router import router as evals_router
from llmos.api.openai.evals.runner import EvalRunner
from llmos.api.openai.files.router import router as files_router
from llmos.api.openai.fine_tuning.router import router as fine_tuning_router
from llmos.api.openai.fine_tuning.searches import open_searches
from llmos.api.openai.fine_tuning.searches import router as searches_router
from llmos.api.openai.models.router import router as models_router
from llmos.api.openai.moderations.router import router as moderations_router
from llmos.api.openai.responses.router import router as responses_router
from llmos.api.openai.vector_stores.recommendations import router as recommendations_router
from llmos.api.openai.vector_stores.router import router as vector_stores_router
from llmos.api.openai.vector_stores.serving import resume_ingestion
from llmos.api.tasks.classifications import router as classifications_router
from llmos.api.tasks.ner import router as ner_router
from llmos.api.tasks.rerank import router as rerank_router
from llmos.config import Settings
from llmos.engine.protocol import EngineClient
from llmos.export import ExportOperations
from llmos.kernel.maintenance import MaintenanceLoop, run_maintenance
from llmos.kernel.supervisor import JobSupervisor
from llmos.monitoring.alerts.service import AlertService
from llmos.monitoring.http import HttpMetricsMiddleware
from llmos.monitoring.sampler import MetricsSampler
from llmos.platform import Platform
from llmos.registry.pulls import PullOperations
from llmos.training.batches import validate_batch_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouteInfo:
    path: str
    methods: frozenset[str]
    route: APIRoute


def api_routes(app: FastAPI) -> list[RouteInfo]:
    """Every API route with its full path (FastAPI keeps included routers nested)."""
    return [
        RouteInfo(
            path=ctx.path_format or ctx.path or "", methods=frozenset(ctx.methods or ()) - {"HEAD"}, route=ctx.route
        )
        for ctx in iter_route_contexts(app.routes)
        if isinstance(ctx.route, APIRoute)
    ]


def create_app(
    settings: Settings | None = None, *, platform: Platform | None = None, engine: EngineClient | None = None
) -> FastAPI:
    """The whole API. ``platform`` and ``engine`` may be injected (tests pass a fake engine)."""
    settings = settings or (platform.settings if platform else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = platform is None
        app.state.platform = platform or Platform.open(settings)
        app.state.engine = engine or app.state.platform.make_engine()
        admin_key = settings.admin_key.get_secret_value() if settings.admin_key else None
        new_key = app.state.platform.keys.bootstrap_admin(admin_key)
        if new_key:
            # Shown once: only its hash is stored.
            print(f"\n  Admin API key (shown once, store it now): {new_key}\n", flush=True)
        supervisor = None
        if settings.max_concurrent_jobs > 0:
            p = app.state.platform
            supervisor = JobSupervisor(p.jobs, p.training_quota, p.settings)
            supervisor.start()
        app.state.supervisor = supervisor
        # Searches' trials are jobs: the runner drives them where a supervisor runs jobs.
        app.state.searches, search_runner = open_searches(app.state.platform, run=supervisor is not None)
        # Batch files' lines are checked by the endpoints' own request schemas.
        app.state.platform.files.validators["batch"] = partial(validate_batch_file, check_body=check_body)
        batches = None
        if settings.batch_concurrency > 0:
            batches = BatchRunner(app.state.platform, app.state.engine)
            batches.start()
        app.state.batches = batches
        eval_runner = None
        if settings.eval_concurrency > 0:
            eval_runner = EvalRunner(app.state.platform, app.state.engine)
            eval_runner.start()
        app.state.eval_runner = eval_runner
        app.state.pulls = PullOperations(app.state.platform.registry)
        app.state.exports = ExportOperations(app.state.platform.registry, app.state.platform.files)
        app.state.console_sessions = (
            ConsoleSessions(app.state.platform.keys.derived_secret("console-session"), settings.console_session_ttl_s)
            if settings.console_enabled
            else None
        )
        maintenance = None
        if settings.maintenance_interval_s > 0:
            p = app.state.platform
            maintenance = MaintenanceLoop(lambda: run_maintenance(p), settings.maintenance_interval_s)
            maintenance.start()
        sampler = None
        if settings.metrics_enabled:
            p = app.state.platform
            sampler = MetricsSampler(app.state.engine.stats, p.jobs, settings.metrics_sample_interval_s)
            sampler.start()
        app.state.metrics_sampler = sampler
        app.state.alerts = AlertService(settings, app.state.platform.db)
        app.state.alerts.start()
        app.state.ingestion = resume_ingestion(app.state.platform, app.state.engine)
        try:
            yield
        finally:
            await app.state.ingestion.close()
            await asyncio.to_thread(app.state.alerts.stop)
            if sampler is not None:
                await asyncio.to_thread(sampler.stop)
            await asyncio.to_thread(app.state.pulls.close)
            await asyncio.to_thread(app.state.exports.close)
            if maintenance is not None:
                await asyncio.to_thread(maintenance.stop)
            app.state.platform.audit.flush_denied()  # what was tallied since the last run
            if batches is not None:
                await batches.stop()
            if eval_runner is not None:
                await eval_runner.stop()
            if search_runner is not None:
                await asyncio.to_thread(search_runner.stop)
            if app.state.searches is not None:
                app.state.searches.close()
            if supervisor is not None:
                await asyncio.to_thread(supervisor.stop)
            await app.state.engine.shutdown()
            if owned:
                app.state.platform.close()

    app = FastAPI(
        title="LLM OS",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible API of LLM OS. Authenticate with `Authorization: Bearer <key>`.",
        # FastAPI's docs pages load their scripts from a public CDN: only when an operator asks.
        docs_url="/docs" if settings.docs_enabled else None,
        redoc_url="/redoc" if settings.docs_enabled else None,
    )
    install_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        max_json_depth=settings.max_json_depth,
        max_upload_bytes=settings.max_upload_bytes,
        body_timeout_s=settings.http_body_timeout_s,
    )
    allowed = allowed_hosts_for(settings.host, settings.allowed_hosts)
    if allowed is not None:
        app.add_middleware(HostCheckMiddleware, allowed=allowed)
    if settings.metrics_enabled:  # outermost: it also counts what the edge checks refuse
        app.add_middleware(HttpMetricsMiddleware)
    for router in (
        health.router,
        metrics_router,
        admin_router,
        alerts_router,
        cluster_router,
        usage.router,
        models_router,
        model_management_router,
        exports_router,
        aliases_router,
        chat_router,
        stored_completions_router,
        feedback_router,
        completions_router,
        embeddings_router,
        files_router,
        fine_tuning_router,
        searches_router,
        batches_router,
        evals_router,
        classifications_router,
        ner_router,
        rerank_router,
        moderations_router,
        vector_stores_router,
        recommendations_router,
        responses_router,
    ):
        app.include_router(router)
    if settings.console_enabled:
        app.router.routes.append(console_mount())
    return app
