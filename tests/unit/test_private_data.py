"""Private data: an owner-only home, keys hashed with a secret kept outside the database, secrets
masked in settings, and no server paths in what tenants see of models."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from llmos.api import create_app
from llmos.config import Settings
from llmos.errors import AuthenticationError
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY


def _llmos(*args: str) -> None:
    """Runs the `llmos` command in a process of its own, started with the common umask 022."""
    subprocess.run(
        [sys.executable, "-c", "from llmos.cli.main import app; app()", *args],
        check=True,
        capture_output=True,
        preexec_fn=lambda: os.umask(0o022),
        timeout=300,
    )


def test_a_fresh_home_is_owner_only(tmp_path: Path, tiny_chat_dir: Path) -> None:
    home = tmp_path / "home"
    _llmos("keys", "create", "--name", "app", "--home", str(home))
    _llmos("pull", f"file:{tiny_chat_dir}", "--name", "tiny", "--home", str(home))
    paths = [home, *home.rglob("*")]
    names = {p.name for p in paths}
    assert {"llmos.db", "secret", "store"} <= names
    assert sum(p.is_file() for p in paths) > 5
    for path in paths:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path.relative_to(tmp_path)} is {mode:o}"


def test_looser_paths_in_the_home_are_tightened_with_a_warning(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    shared = settings.home / "shared"
    shared.mkdir(parents=True)
    shared.chmod(0o755)
    (shared / "data.jsonl").write_text("{}\n")
    (shared / "data.jsonl").chmod(0o644)
    with caplog.at_level(logging.WARNING):
        Platform.open(settings).close()
    assert "made owner-only" in caplog.text
    assert stat.S_IMODE(shared.stat().st_mode) == 0o700
    assert stat.S_IMODE((shared / "data.jsonl").stat().st_mode) == 0o600


def test_the_database_alone_cannot_verify_a_known_key(platform: Platform, tmp_path: Path) -> None:
    platform.keys.bootstrap_admin(ADMIN_KEY)  # a key a person chose: the easiest to guess
    info, key = platform.keys.create("app")
    database = platform.settings.home / "llmos.db"
    with sqlite3.connect(database) as db:
        stored = {row[0] for row in db.execute("SELECT key_hash FROM api_keys")}
    for known in (ADMIN_KEY, key):
        assert hashlib.sha256(known.encode()).hexdigest() not in stored
    # The same database beside another server secret: no key it holds verifies.
    copy = Settings(home=tmp_path / "copy", dtype="float32")
    copy.home.mkdir()
    shutil.copy(database, copy.home / "llmos.db")
    stranger = Platform.open(copy)
    try:
        for known in (ADMIN_KEY, key):
            with pytest.raises(AuthenticationError):
                stranger.keys.verify(known)
    finally:
        stranger.close()
    assert platform.keys.verify(key).id == info.id
    assert "admin" in platform.keys.verify(ADMIN_KEY).scopes


def test_keys_stored_before_keyed_hashing_still_verify_and_are_rehashed(platform: Platform) -> None:
    info, key = platform.keys.create("old")
    database = platform.settings.home / "llmos.db"
    unkeyed = hashlib.sha256(key.encode()).hexdigest()
    with sqlite3.connect(database) as db:
        db.execute("UPDATE api_keys SET key_hash = ? WHERE id = ?", (unkeyed, info.id))
    assert platform.keys.verify(key).id == info.id
    with sqlite3.connect(database) as db:
        (stored,) = db.execute("SELECT key_hash FROM api_keys WHERE id = ?", (info.id,)).fetchone()
    assert stored != unkeyed
    platform.keys._verified.clear()
    assert platform.keys.verify(key).id == info.id  # by its keyed hash now


def test_secrets_are_masked_in_settings(platform: Platform) -> None:
    settings = platform.settings.model_copy(
        update={"database_url": "postgresql+psycopg://llmos:pg-password-1@db.internal/llmos"}
    )
    shown = settings.as_public_dict()
    assert "pg-password-1" not in str(shown) and ADMIN_KEY not in str(shown)
    assert shown["database_url"] == "postgresql+psycopg://llmos:***@db.internal/llmos"
    with TestClient(create_app(platform=platform)) as http:
        body = http.get("/v1/admin/settings", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert body["admin_key"] == "***" and ADMIN_KEY not in str(body)


def test_tenants_never_see_server_paths_in_model_sources(loaded_platform: Platform, tiny_chat_dir: Path) -> None:
    loaded_platform.tenants.create("acme")
    _, tenant_key = loaded_platform.keys.create("acme-app", tenant="acme")
    with TestClient(create_app(platform=loaded_platform)) as http:
        seen = http.get("/v1/models/tiny-chat", headers={"Authorization": f"Bearer {tenant_key}"}).json()
        listed = http.get("/v1/models", headers={"Authorization": f"Bearer {tenant_key}"}).json()["data"]
        admin = http.get("/v1/models/tiny-chat", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert seen["source"] == f"file:{tiny_chat_dir.name}"
    assert all(str(tiny_chat_dir.parent) not in m["source"] for m in listed)
    assert admin["source"] == f"file:{tiny_chat_dir}"


SECRET_NAME = re.compile(r"(password|passwd|secret_key|access_key|api_key|admin_key|(^|_)token$)")


def test_secret_settings_follow_the_secret_str_convention() -> None:
    """Every setting named like a secret is typed SecretStr, so `llmos config` and
    /v1/admin/settings mask it whatever module adds it."""
    for name, field in Settings.model_fields.items():
        if SECRET_NAME.search(name):
            assert "SecretStr" in str(field.annotation), f"setting {name} looks secret but is not a SecretStr"

    class WithWebhook(Settings):
        webhook_token: SecretStr | None = None

    shown = WithWebhook(webhook_token="hook-secret-1").as_public_dict()
    assert shown["webhook_token"] == "***" and "hook-secret-1" not in str(shown)
