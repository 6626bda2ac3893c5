"""The web console in-process: sign-in with a key, the session cookie and its CSRF token on the
JSON API, sign-out, ended sessions, and pages by scope. The browser tests are in
tests/integration/test_console_browser.py."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from llmos.api import create_app
from llmos.api.console.pages import PAGES
from llmos.api.console.sessions import SESSION_COOKIE, ConsoleSessions
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY


@pytest.fixture
def ui(platform: Platform) -> Iterator[TestClient]:
    with TestClient(create_app(platform=platform)) as client:
        yield client


def _sign_in(ui: TestClient, key: str) -> tuple[int, str]:
    form = ui.get("/ui/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert token is not None
    resp = ui.post("/ui/login", data={"csrf_token": token.group(1), "api_key": key}, follow_redirects=False)
    return resp.status_code, resp.text


def _csrf(ui: TestClient, page: str = "overview") -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', ui.get(f"/ui/{page}").text)
    assert match is not None
    return match.group(1)


def test_sign_in_sets_a_strict_http_only_cookie_and_shows_the_pages(ui: TestClient) -> None:
    assert ui.get("/ui/overview", follow_redirects=False).headers["location"] == "/ui/login"
    status, _ = _sign_in(ui, ADMIN_KEY)
    assert status == 303
    cookie = next(c for c in ui.cookies.jar if c.name == SESSION_COOKIE)
    assert cookie.has_nonstandard_attr("HttpOnly")
    assert cookie.get_nonstandard_attr("SameSite") == "strict"
    for page in PAGES:
        resp = ui.get(f"/ui/{page.slug}")
        assert resp.status_code == 200, page.slug
        assert "script-src 'self'" in resp.headers["content-security-policy"]
        assert "<script>" not in resp.text  # nothing inline: the policy forbids it
    assert ui.get("/ui/static/console.js").status_code == 200


def test_a_wrong_key_or_a_forged_form_signs_nobody_in(ui: TestClient, platform: Platform) -> None:
    status, text = _sign_in(ui, "sk-llmos-000000000000-wrongwrongwrongwrongwrong")
    assert status == 401
    assert "Incorrect API key" in text
    assert SESSION_COOKIE not in ui.cookies
    ui.get("/ui/login")
    resp = ui.post("/ui/login", data={"csrf_token": "forged", "api_key": ADMIN_KEY}, follow_redirects=False)
    assert resp.status_code == 403
    assert SESSION_COOKIE not in ui.cookies


def test_the_session_calls_the_api_and_state_changes_need_its_csrf_token(ui: TestClient, platform: Platform) -> None:
    _sign_in(ui, ADMIN_KEY)
    assert ui.get("/v1/admin/tenants").status_code == 200  # reads need no token
    resp = ui.post("/v1/admin/tenants", json={"id": "sneaky"})
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "csrf_failed"
    assert resp.json()["error"].keys() == {"message", "type", "param", "code"}
    assert [t.id for t in platform.tenants.list()] == ["default"]  # nothing changed
    resp = ui.post("/v1/admin/tenants", json={"id": "fine"}, headers={"X-CSRF-Token": _csrf(ui)})
    assert resp.status_code == 201, resp.text


def test_sign_out_and_expiry_end_the_session(ui: TestClient, platform: Platform) -> None:
    _sign_in(ui, ADMIN_KEY)
    cookie = ui.cookies[SESSION_COOKIE]
    token = _csrf(ui)
    assert ui.post("/ui/logout", data={"csrf_token": "wrong"}).status_code == 403
    assert ui.post("/ui/logout", data={"csrf_token": token}, follow_redirects=False).status_code == 303
    ui.cookies.set(SESSION_COOKIE, cookie)  # replayed after sign-out
    assert ui.get("/v1/admin/tenants").json()["error"]["code"] == "session_expired"
    assert ui.get("/ui/overview", follow_redirects=False).headers["location"] == "/ui/login?ended=1"
    # An expired one, and a forged one, likewise.
    sessions: ConsoleSessions = ui.app.state.console_sessions  # type: ignore[attr-defined]
    sessions._ttl_s = 0
    _sign_in(ui, ADMIN_KEY)
    time.sleep(0.01)
    assert ui.get("/v1/admin/tenants").status_code == 401
    ui.cookies.set(SESSION_COOKIE, cookie.split(".")[0] + ".0")
    assert ui.get("/v1/admin/tenants").status_code == 401


def test_a_keys_scopes_and_tenant_decide_what_it_sees(ui: TestClient, platform: Platform) -> None:
    platform.tenants.create("acme")
    _, secret = platform.keys.create("reader", tenant="acme", scopes=("inference",))
    _sign_in(ui, secret)
    overview = ui.get("/ui/overview").text
    assert 'href="/ui/playground"' in overview
    assert 'href="/ui/admin"' not in overview
    assert ui.get("/ui/admin").status_code == 403
    assert ui.get("/v1/admin/tenants").status_code == 403
    # A key revoked after sign-in ends its sessions.
    platform.keys.revoke(platform.keys.list()[-1].id)
    assert ui.get("/v1/models").json()["error"]["code"] == "revoked_api_key"
    assert ui.get("/ui/overview", follow_redirects=False).status_code == 303
