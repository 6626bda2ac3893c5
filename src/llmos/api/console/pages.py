"""The web console at /ui: sign-in and sign-out forms and the server-rendered pages.

The pages hold no data of their own: their scripts (``static/``) call the JSON API with the
session cookie (``api/deps.py`` accepts it, with the CSRF token for state-changing requests), so
every operation has one implementation and the key's scopes and tenant decide what it sees and
may do. Mounted as plain Starlette routes, outside the API's route table and OpenAPI schema.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from llmos.api.console.sessions import SESSION_COOKIE, ConsoleSessions, Session
from llmos.errors import AuthenticationError, NotFoundError, PermissionDeniedError
from llmos.platform import Platform
from llmos.security import ApiKeyInfo

HERE = Path(__file__).parent
LOGIN_CSRF_COOKIE = "llmos_login_csrf"
MAX_FORM_BYTES = 8192
# Scripts and styles come only from this server, never inline: a page cannot be made to run
# anything else, nor be framed by another site. Images may be blob: URLs because a search's
# plots are files fetched with the session and shown from memory (a blob is made by the page's
# own script; it cannot run).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True)
class Page:
    slug: str
    title: str
    scope: str
    """The scope a key needs to see the page (admin keys see every page)."""


PAGES = (
    Page("overview", "Overview", "inference"),
    Page("models", "Models", "inference"),
    Page("playground", "Playground", "inference"),
    Page("fine-tuning", "Fine-tuning", "fine-tune"),
    Page("searches", "Searches", "fine-tune"),
    Page("files", "Files", "files"),
    Page("alerts", "Alerts", "admin"),
    Page("usage", "Usage", "inference"),
    Page("cluster", "Cluster", "admin"),
    Page("admin", "Admin", "admin"),
)
templates = Jinja2Templates(directory=str(HERE / "templates"))


def _sessions(request: Request) -> ConsoleSessions:
    sessions: ConsoleSessions = request.app.state.console_sessions
    return sessions


def _platform(request: Request) -> Platform:
    platform: Platform = request.app.state.platform
    return platform


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _render(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
    response = templates.TemplateResponse(request, template, context, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response


def _signed_in(request: Request) -> tuple[Session, ApiKeyInfo] | None:
    session = _sessions(request).find(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    try:
        key = _platform(request).keys.current(session.key_id)
    except AuthenticationError:
        return None
    return session, key


def _to_login(request: Request, *, ended: bool) -> Response:
    response = RedirectResponse("/ui/login?ended=1" if ended else "/ui/login", status_code=303)
    if ended:
        response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def login_form(request: Request) -> Response:
    token = secrets.token_urlsafe(32)
    ended = request.query_params.get("ended") == "1"
    message = "Your session has ended; sign in again." if ended else None
    response = _render(request, "login.html", csrf_token=token, error=None, message=message)
    response.set_cookie(
        LOGIN_CSRF_COOKIE, token, max_age=3600, path="/ui", httponly=True, samesite="strict", secure=_secure(request)
    )
    return response


async def login(request: Request) -> Response:
    form = await request.form(max_files=0, max_fields=4, max_part_size=MAX_FORM_BYTES)
    token, api_key = str(form.get("csrf_token") or ""), str(form.get("api_key") or "").strip()
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not (token and expected and hmac.compare_digest(token, expected)):
        return _render(request, "login.html", 403, csrf_token=expected or "", error="The form expired; try again.")
    platform = _platform(request)
    try:
        if not api_key:
            raise AuthenticationError("Enter an API key.", code="missing_api_key")
        key = platform.keys.verify(api_key)
        if platform.tenants.current(key.tenant).disabled:
            raise PermissionDeniedError(f"tenant {key.tenant} is disabled", code="tenant_disabled")
    except (AuthenticationError, PermissionDeniedError, NotFoundError) as exc:
        platform.audit.denied.note(
            client=request.client.host if request.client else None,
            route="POST /ui/login",
            code=exc.code,
            tenant=None,
            key_id=None,
        )
        return _render(request, "login.html", exc.status_code, csrf_token=token, error=exc.message)
    _, cookie = _sessions(request).create(key.id)
    platform.audit.record(
        "console.sign_in",
        tenant=key.tenant,
        key_id=key.id,
        target=key.id,
        client=request.client.host if request.client else None,
    )
    response = RedirectResponse("/ui/overview", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        cookie,
        max_age=_sessions(request).ttl_s,
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/ui")
    return response


async def logout(request: Request) -> Response:
    signed_in = _signed_in(request)
    if signed_in is None:
        return _to_login(request, ended=True)
    session, _ = signed_in
    form = await request.form(max_files=0, max_fields=2, max_part_size=MAX_FORM_BYTES)
    if not hmac.compare_digest(str(form.get("csrf_token") or ""), session.csrf_token):
        raise PermissionDeniedError("This form lacks the session's CSRF token.", code="csrf_failed")
    _sessions(request).end(request.cookies.get(SESSION_COOKIE))
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


def visible_pages(key: ApiKeyInfo) -> list[Page]:
    return [p for p in PAGES if key.allows(p.scope)]


async def page(request: Request) -> Response:
    slug = request.path_params["page"]
    signed_in = _signed_in(request)
    if signed_in is None:
        return _to_login(request, ended=SESSION_COOKIE in request.cookies)
    session, key = signed_in
    found = next((p for p in PAGES if p.slug == slug), None)
    if found is None:
        return _render(request, "missing.html", 404, **_context(session, key, None))
    if not key.allows(found.scope):
        return _render(request, "missing.html", 403, **_context(session, key, found))
    return _render(request, f"{slug}.html", **_context(session, key, found))


def _context(session: Session, key: ApiKeyInfo, current: Page | None) -> dict[str, Any]:
    return {
        "csrf_token": session.csrf_token,
        "key": key,
        "scopes": " ".join(key.scopes),
        "admin": "admin" in key.scopes,
        "pages": visible_pages(key),
        "current": current,
    }


async def home(request: Request) -> Response:
    return RedirectResponse("/ui/overview" if _signed_in(request) else "/ui/login", status_code=303)


def console_mount() -> Mount:
    """Everything under /ui."""
    routes = [
        Route("/", home, methods=["GET"]),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="console-static"),
        Route("/{page:str}", page, methods=["GET"]),
    ]
    return Mount("/ui", app=Router(routes=routes))
