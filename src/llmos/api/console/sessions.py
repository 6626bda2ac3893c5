"""Console sessions: an API key exchanged at sign-in for a session cookie.

The cookie holds a random session id signed with a key derived from the server secret
(HMAC-SHA256); the session itself (the key's id, its CSRF token, its end) lives in this process,
so signing out ends it at once and a restart ends them all. The cookie is httpOnly and
SameSite=Strict, and every state-changing request a session makes must also carry its CSRF token
in the ``X-CSRF-Token`` header (forms: a ``csrf_token`` field), which a page from another site
cannot read.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from llmos.errors import AuthenticationError, PermissionDeniedError

SESSION_COOKIE = "llmos_session"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_SESSIONS = 10_000  # the oldest is dropped beyond this (its user signs in again)


@dataclass(frozen=True)
class Session:
    id: str
    key_id: str
    csrf_token: str
    expires_at: float


class ConsoleSessions:
    def __init__(self, signing_key: bytes, ttl_s: int) -> None:
        self._signing_key = signing_key
        self._ttl_s = ttl_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def ttl_s(self) -> int:
        return self._ttl_s

    def create(self, key_id: str) -> tuple[Session, str]:
        """A new session for the key and the cookie value that names it."""
        session = Session(
            id=secrets.token_urlsafe(32),
            key_id=key_id,
            csrf_token=secrets.token_urlsafe(32),
            expires_at=time.time() + self._ttl_s,
        )
        with self._lock:
            self._sessions[session.id] = session
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session, f"{session.id}.{self._sign(session.id)}"

    def find(self, cookie: str | None) -> Session | None:
        """The live session a cookie names; None for a missing, forged, ended or expired one."""
        if not cookie:
            return None
        session_id, _, signature = cookie.partition(".")
        if not hmac.compare_digest(signature, self._sign(session_id)):
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires_at <= time.time():
                del self._sessions[session_id]
                session = None
        return session

    def end(self, cookie: str | None) -> None:
        session = self.find(cookie)
        if session is not None:
            with self._lock:
                self._sessions.pop(session.id, None)

    def authenticate(self, cookie: str, method: str, csrf_token: str | None) -> Session:
        """The session behind an API request made with the cookie: 401 ``session_expired`` when it
        is gone, 403 ``csrf_failed`` for a state-changing request without its CSRF token."""
        session = self.find(cookie)
        if session is None:
            raise AuthenticationError(
                "Your console session has ended; sign in again with an API key.", code="session_expired"
            )
        if method not in SAFE_METHODS and not (csrf_token and hmac.compare_digest(csrf_token, session.csrf_token)):
            raise PermissionDeniedError(
                "This request lacks the session's CSRF token (X-CSRF-Token header).", code="csrf_failed"
            )
        return session

    def _sign(self, session_id: str) -> str:
        return hmac.new(self._signing_key, session_id.encode(), hashlib.sha256).hexdigest()
