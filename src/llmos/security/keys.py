"""API keys: random, shown once, stored as a keyed hash, compared in constant time.

A key reads ``sk-llmos-<id>-<secret>``: the id finds the row without scanning, the hash of
the whole key is what is compared. Keys carry 256 bits of randomness, so a fast hash is
enough (a slow password hash protects low-entropy secrets, which these are not). The hash is
HMAC-SHA256 with the server secret, kept outside the database (``LLMOS_HOME/secret`` or the
``secret_file`` setting): a copy of the database alone cannot test guesses of a key, such as a
configured admin key chosen by a person. Rows hashed before keys were keyed (plain SHA-256)
still verify, and are re-stored keyed on their first use.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, overload

from sqlalchemy import select, update

from llmos.errors import AuthenticationError, InvalidRequestError, NotFoundError
from llmos.registry.db import Database
from llmos.registry.tables import ApiKeyRow, TenantRow
from llmos.security.limits import Limits

SCOPES = ("inference", "files", "fine-tune", "models", "metrics", "admin")
_KEY = re.compile(r"^sk-llmos-([0-9a-f]{12})-[A-Za-z0-9_-]{20,128}$")
_BOOTSTRAP_ID = "000000000000"
VERIFIED_TTL_S = 2.0


@dataclass(frozen=True)
class ApiKeyInfo:
    id: str
    name: str
    tenant: str
    scopes: tuple[str, ...]
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    limits: Limits = field(default_factory=Limits)

    def allows(self, scope: str) -> bool:
        return "admin" in self.scopes or scope in self.scopes

    @classmethod
    def from_row(cls, row: ApiKeyRow) -> ApiKeyInfo:
        return cls(
            id=row.id,
            name=row.name,
            tenant=row.tenant,
            scopes=tuple(row.scopes),
            created_at=_aware(row.created_at),
            expires_at=_aware(row.expires_at),
            revoked_at=_aware(row.revoked_at),
            limits=Limits.parse(row.limits),
        )

    def public(self) -> dict[str, Any]:
        """The key as the admin API shows it: never the secret, nor its hash."""

        def ts(value: datetime | None) -> int | None:
            return int(value.timestamp()) if value else None

        return {
            "id": self.id,
            "object": "api_key",
            "name": self.name,
            "tenant": self.tenant,
            "scopes": list(self.scopes),
            "created_at": ts(self.created_at),
            "expires_at": ts(self.expires_at),
            "revoked_at": ts(self.revoked_at),
            "limits": self.limits.as_dict(),
        }


@overload
def _aware(value: datetime) -> datetime: ...
@overload
def _aware(value: None) -> None: ...
@overload
def _aware(value: datetime | None) -> datetime | None: ...
def _aware(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; every stored time is UTC.
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


def _unkeyed_hash(key: str) -> str:
    """How keys were stored before they were keyed; only ever compared, to re-store them keyed."""
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    def __init__(self, db: Database, secret: bytes) -> None:
        self.db = db
        self._secret = secret
        # Verified keys by hash, for VERIFIED_TTL_S: a flood of requests (or of refusals) costs a
        # hash and a dict lookup each, not a database query. Changes made here clear it at once;
        # a key revoked through another server stops working within the TTL.
        self._verified: dict[str, tuple[float, ApiKeyInfo]] = {}

    def derived_secret(self, purpose: str) -> bytes:
        """A key for another use of the server secret (e.g. signing console sessions), so that
        nothing signed for one purpose is valid for another."""
        return hmac.new(self._secret, f"llmos:{purpose}".encode(), hashlib.sha256).digest()

    def _hash(self, key: str) -> str:
        return hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()

    def create(
        self,
        name: str,
        *,
        tenant: str = "default",
        scopes: tuple[str, ...] = ("inference",),
        expires_at: datetime | None = None,
        secret: str | None = None,
        key_id: str | None = None,
        limits: Limits | None = None,
    ) -> tuple[ApiKeyInfo, str]:
        """Create a key; returns its record and the key itself, which is never shown again."""
        unknown = set(scopes) - set(SCOPES)
        if unknown or not scopes:
            raise InvalidRequestError(f"unknown scopes {sorted(unknown)}; choose from {SCOPES}", param="scopes")
        if expires_at is not None and _aware(expires_at) <= datetime.now(UTC):
            raise InvalidRequestError("expires_at must be in the future", param="expires_at")
        key_id = key_id or secrets.token_hex(6)
        key = secret or f"sk-llmos-{key_id}-{secrets.token_urlsafe(32)}"
        with self.db.session() as s:
            if s.get(TenantRow, tenant) is None:
                raise NotFoundError(f"no tenant {tenant!r}", param="tenant")
            row = ApiKeyRow(
                id=key_id,
                name=name[:128],
                tenant=tenant,
                key_hash=self._hash(key),
                scopes=list(scopes),
                expires_at=expires_at,
                created_at=datetime.now(UTC),
                limits=(limits or Limits()).as_dict(),
            )
            s.add(row)
            s.flush()
            return ApiKeyInfo.from_row(row), key

    def bootstrap_admin(self, configured: str | None) -> str | None:
        """Make sure an admin key exists. Returns a newly generated key (to show once), else None.

        A configured key (``LLMOS_ADMIN_KEY``) is stored hashed under a fixed id, replacing an
        earlier configured one, so automation can rotate it by restarting with a new value.
        """
        with self.db.session() as s:
            if configured:
                row = s.get(ApiKeyRow, _BOOTSTRAP_ID)
                if row is None:
                    s.add(
                        ApiKeyRow(
                            id=_BOOTSTRAP_ID,
                            name="bootstrap admin",
                            tenant="default",
                            key_hash=self._hash(configured),
                            scopes=["admin"],
                            created_at=datetime.now(UTC),
                        )
                    )
                else:
                    row.key_hash, row.revoked_at = self._hash(configured), None
                    self._verified.clear()
                return None
            has_admin = any(
                "admin" in r.scopes for r in s.scalars(select(ApiKeyRow).where(ApiKeyRow.revoked_at.is_(None))).all()
            )
        if has_admin:
            return None
        _, key = self.create("admin", scopes=("admin",))
        return key

    def verify(self, key: str) -> ApiKeyInfo:
        digest = self._hash(key)
        hit = self._verified.get(digest)
        if hit is not None and time.monotonic() - hit[0] < VERIFIED_TTL_S:
            info = hit[1]
            if info.expires_at is None or info.expires_at > datetime.now(UTC):
                return info
        info = self._verify_stored(key)
        if len(self._verified) > 10_000:  # bounded: many keys in use just means more queries
            self._verified.clear()
        self._verified[digest] = (time.monotonic(), info)
        return info

    def _verify_stored(self, key: str) -> ApiKeyInfo:
        match = _KEY.fullmatch(key)
        key_id = match.group(1) if match else _BOOTSTRAP_ID
        with self.db.session() as s:
            row = s.get(ApiKeyRow, key_id)
            keyed = self._hash(key)
            # Compare even when the row is missing so timing does not reveal which ids exist.
            stored = row.key_hash if row is not None else self._hash("missing")
            unkeyed = not hmac.compare_digest(stored, keyed) and hmac.compare_digest(stored, _unkeyed_hash(key))
            if row is None or not (unkeyed or hmac.compare_digest(stored, keyed)):
                raise AuthenticationError("Incorrect API key provided.")
            if unkeyed:
                row.key_hash = keyed  # re-stored keyed: the database alone no longer tests guesses of it
            info = ApiKeyInfo.from_row(row)
            now = datetime.now(UTC)
            if info.revoked_at is not None:
                raise AuthenticationError("This API key has been revoked.", code="revoked_api_key")
            if info.expires_at is not None and info.expires_at <= now:
                raise AuthenticationError("This API key has expired.", code="expired_api_key")
            last = _aware(row.last_used_at)
            if last is None or (now - last).total_seconds() > 60:  # one write a minute, not per request
                row.last_used_at = now
            return info

    def current(self, key_id: str) -> ApiKeyInfo:
        """The key with this id if it may still be used (a console session signed in with it): 401
        once it is revoked, expired or gone."""
        with self.db.session() as s:
            row = s.get(ApiKeyRow, key_id)
            info = ApiKeyInfo.from_row(row) if row is not None else None
        if info is None:
            raise AuthenticationError("This API key no longer exists.")
        if info.revoked_at is not None:
            raise AuthenticationError("This API key has been revoked.", code="revoked_api_key")
        if info.expires_at is not None and info.expires_at <= datetime.now(UTC):
            raise AuthenticationError("This API key has expired.", code="expired_api_key")
        return info

    def get(self, key_id: str) -> ApiKeyInfo:
        with self.db.session() as s:
            row = s.get(ApiKeyRow, key_id)
            if row is None:
                raise NotFoundError(f"no API key {key_id!r}", param="key_id")
            return ApiKeyInfo.from_row(row)

    def list(self) -> list[ApiKeyInfo]:
        with self.db.session() as s:
            return [ApiKeyInfo.from_row(r) for r in s.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))]

    def revoke(self, key_id: str) -> ApiKeyInfo:
        """Revoke an active key. One conditional UPDATE decides, so of concurrent revokes exactly one
        succeeds; the others, like a revoke of a revoked key, find no active key (404)."""
        with self.db.session() as s:
            revoked = s.execute(
                update(ApiKeyRow)
                .where(ApiKeyRow.id == key_id, ApiKeyRow.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
            if revoked.rowcount != 1:  # type: ignore[attr-defined]
                raise NotFoundError(f"no active API key {key_id!r}", param="key_id")
            self._verified.clear()
            row = s.get(ApiKeyRow, key_id, populate_existing=True)
            assert row is not None
            return ApiKeyInfo.from_row(row)
