"""FastAPI dependencies as typed aliases: the platform, the engine, and the caller's API key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, Request

from llmos.api.console.sessions import CSRF_HEADER, SESSION_COOKIE, ConsoleSessions
from llmos.config import Settings
from llmos.engine.protocol import EngineClient
from llmos.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from llmos.platform import Platform
from llmos.security import ApiKeyInfo


def get_platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


def get_engine(request: Request) -> EngineClient:
    engine: EngineClient = request.app.state.engine
    return engine


def get_settings(request: Request) -> Settings:
    return get_platform(request).settings


PlatformDep = Annotated[Platform, Depends(get_platform)]
EngineDep = Annotated[EngineClient, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def require(scope: str) -> Callable[[Request], ApiKeyInfo]:
    """A dependency that authenticates the bearer key (header only, never the query string),
    refuses it while its tenant is disabled, and checks it grants ``scope``; the scope is
    recorded on the route for the route-table audit."""

    def dependency(request: Request) -> ApiKeyInfo:
        platform = get_platform(request)
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        key = None
        try:
            if not header and _console_session(request) is not None:
                key = _session_key(request)
            elif scheme.lower() != "bearer" or not token.strip():
                raise AuthenticationError(
                    "You didn't provide an API key. Provide it in the Authorization header as 'Bearer YOUR_KEY'.",
                    code="missing_api_key",
                )
            else:
                key = platform.keys.verify(token.strip())
            _check_tenant(platform, key.tenant)
            if not key.allows(scope):
                raise PermissionDeniedError(f"This API key lacks the '{scope}' scope.")
        except (AuthenticationError, PermissionDeniedError) as exc:
            # Counted in memory and audited aggregated: a denied request writes nothing to the
            # database, and beyond the address's allowance it is answered 429 instead.
            route = getattr(request.scope.get("route"), "path", None) or "?"
            platform.audit.denied.note(
                client=request.client.host if request.client else None,
                route=f"{request.method} {route}",
                code=exc.code,
                tenant=key.tenant if key else None,
                key_id=key.id if key else None,
            )
            raise
        request.state.api_key = key
        return key

    dependency.required_scope = scope  # type: ignore[attr-defined]
    return dependency


def _console_session(request: Request) -> str | None:
    """The console's session cookie, when the console is on and the request carries one."""
    if getattr(request.app.state, "console_sessions", None) is None:
        return None
    return request.cookies.get(SESSION_COOKIE)


def _session_key(request: Request) -> ApiKeyInfo:
    """The key a console session signed in with, checked again as if it were presented now
    (revoked or expired since: 401), with the CSRF token for state-changing requests."""
    sessions: ConsoleSessions = request.app.state.console_sessions
    session = sessions.authenticate(
        request.cookies.get(SESSION_COOKIE, ""), request.method, request.headers.get(CSRF_HEADER)
    )
    return get_platform(request).keys.current(session.key_id)


def _check_tenant(platform: Platform, tenant_id: str) -> None:
    """403 ``tenant_disabled`` for every key of a disabled tenant (or of one that no longer exists)."""
    try:
        disabled = platform.tenants.current(tenant_id).disabled
    except NotFoundError:
        disabled = True
    if disabled:
        raise PermissionDeniedError(f"tenant {tenant_id} is disabled", code="tenant_disabled")


InferenceKey = Annotated[ApiKeyInfo, Depends(require("inference"))]
AdminKey = Annotated[ApiKeyInfo, Depends(require("admin"))]
