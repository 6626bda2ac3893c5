from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmos.cli.main import app

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_pull_list_show_rm(home: Path, tiny_chat_dir: Path) -> None:
    result = runner.invoke(app, ["pull", f"file:{tiny_chat_dir}", "--name", "tiny"])
    assert result.exit_code == 0, result.output
    assert "pulled tiny version 1" in result.output
    listing = runner.invoke(app, ["models", "list"])
    assert "tiny" in listing.output and "chat" in listing.output
    shown = runner.invoke(app, ["models", "show", "tiny"])
    assert json.loads(shown.output)["architecture"] == "LlamaForCausalLM"
    assert runner.invoke(app, ["models", "rm", "tiny"]).exit_code == 0
    missing = runner.invoke(app, ["models", "show", "tiny"])
    assert missing.exit_code == 1
    assert "does not exist" in missing.output


def test_pull_of_bad_source_fails_cleanly(home: Path) -> None:
    result = runner.invoke(app, ["pull", "file:/no/such/dir"])
    assert result.exit_code == 1
    assert "no such file" in result.output


def test_keys_create_list_revoke(home: Path) -> None:
    created = runner.invoke(app, ["keys", "create", "--name", "ci", "--scopes", "inference,files"])
    assert created.exit_code == 0, created.output
    key = created.output.strip().splitlines()[-1]
    assert key.startswith("sk-llmos-")
    key_id = key.split("-")[2]
    listing = runner.invoke(app, ["keys", "list"])
    assert key_id in listing.output and key not in listing.output
    assert runner.invoke(app, ["keys", "revoke", key_id]).exit_code == 0
    assert "revoked" in runner.invoke(app, ["keys", "list"]).output
    bad = runner.invoke(app, ["keys", "create", "--scopes", "root"])
    assert bad.exit_code == 1


def test_config_masks_the_admin_key(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMOS_ADMIN_KEY", "super-secret-value")
    monkeypatch.setenv("LLMOS_PORT", "9123")
    result = runner.invoke(app, ["config"])
    assert "super-secret-value" not in result.output
    assert json.loads(result.output)["port"] == 9123


def test_config_file_is_read(home: Path) -> None:
    home.mkdir(parents=True)
    (home / "config.toml").write_text("port = 9555\nmax_n = 3\n")
    result = runner.invoke(app, ["config"])
    data = json.loads(result.output)
    assert (data["port"], data["max_n"]) == (9555, 3)


def test_tenants_usage_and_audit(home: Path) -> None:
    assert runner.invoke(app, ["tenants", "create", "acme", "--limits", '{"requests_per_minute": 5}']).exit_code == 0
    listing = runner.invoke(app, ["tenants", "list"])
    assert "acme" in listing.output and "requests_per_minute=5" in listing.output
    assert runner.invoke(app, ["tenants", "create", "acme"]).exit_code == 1  # exists
    assert runner.invoke(app, ["tenants", "create", "bad", "--limits", '{"nope": 1}']).exit_code == 1
    assert runner.invoke(app, ["tenants", "update", "acme", "--disable"]).exit_code == 0
    assert "disabled" in runner.invoke(app, ["tenants", "list"]).output
    created = runner.invoke(app, ["keys", "create", "--tenant", "acme"])
    assert created.exit_code == 0, created.output
    log = runner.invoke(app, ["audit"], env={"COLUMNS": "250"}).output
    assert "tenant.create" in log and "key.create" in log and "tenant.update" in log
    assert runner.invoke(app, ["usage"]).exit_code == 0
