"""pyproject.toml kept honest: its package data lists only files that exist, and every ADR
states its status."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_data_pattern_matches_a_file() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["llmos"]
    package = ROOT / "src" / "llmos"
    for pattern in patterns:
        assert any(path.is_file() for path in package.glob(pattern)), f"package data {pattern!r} matches no file"


def test_every_adr_states_its_status() -> None:
    adrs = sorted((ROOT / "docs" / "adr").glob("[0-9][0-9][0-9][0-9]-*.md"))
    assert adrs
    for adr in adrs:
        assert "\nStatus: " in adr.read_text(), f"{adr.name} has no 'Status: ' line"
