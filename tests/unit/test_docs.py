"""Docs kept honest: every setting, CLI command and API route is documented."""

from __future__ import annotations

import re
from pathlib import Path

import typer.main

from llmos.api import create_app
from llmos.api.app import api_routes
from llmos.cli.main import app as cli_app
from llmos.config import Settings

DOCS = Path(__file__).resolve().parents[2] / "docs"
README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_documented() -> None:
    text = (DOCS / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{name}` | `LLMOS_{name.upper()}` |" in text, f"setting {name} is not in docs/configuration.md"


def _commands(group: typer.Typer, prefix: str = "llmos") -> list[str]:
    click_group = typer.main.get_group(group)
    names = []
    for name, cmd in click_group.commands.items():  # type: ignore[attr-defined]
        if hasattr(cmd, "commands"):
            names += [f"{prefix} {name} {sub}" for sub in cmd.commands]
        else:
            names.append(f"{prefix} {name}")
    return names


def test_every_cli_command_is_documented() -> None:
    text = (DOCS / "cli.md").read_text()
    for command in _commands(cli_app):
        assert f"`{command}" in text, f"{command} is not in docs/cli.md"


def test_every_api_route_is_documented() -> None:
    text = (DOCS / "api.md").read_text()
    routes = api_routes(create_app(Settings()))
    assert len(routes) > 10
    for info in routes:
        for method in info.methods:
            assert f"`{method} {info.path}`" in text, f"{method} {info.path} is not in docs/api.md"


def test_readme_quickstart_commands_exist() -> None:
    text = README.read_text()
    makefile = (README.parent / "Makefile").read_text()
    for target in re.findall(r"^make (\w+)", text, re.MULTILINE):
        assert re.search(rf"^{target}:", makefile, re.MULTILINE), f"make {target} is not a Makefile target"
    ci = (README.parent / ".ci" / "run").read_text()
    assert "make test" in ci
