"""Liveness and readiness, open without a key so load balancers and orchestrators can probe."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from llmos import __version__
from llmos.api.deps import EngineDep

router = APIRouter(tags=["health"])
PUBLIC_PATHS = frozenset({"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


@router.get("/health")
async def health() -> dict[str, Any]:
    """The process is up and its event loop answers."""
    return {"status": "ok", "version": __version__}


@router.get("/ready")
async def ready(engine: EngineDep) -> Any:
    """The database answers and the engine can take requests."""
    try:
        await engine.check_health()
    except Exception as exc:  # any failure means "not ready", with the reason for the operator
        return JSONResponse({"status": "unavailable", "reason": type(exc).__name__}, status_code=503)
    return {"status": "ready"}
