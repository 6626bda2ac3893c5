"""Benchmark result files: each records what it ran on and none replaces another (the docs cite them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from benchmarks import harness


def test_a_result_records_commit_packages_cpu_and_date(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(harness, "RESULTS", tmp_path)
    path = harness.write_result("serve", {"rows": {"a": 1}})
    assert path.parent == tmp_path and path.name.startswith("serve-")
    saved = json.loads(path.read_text())
    assert saved["rows"] == {"a": 1}
    run = saved["run"]
    assert len(run["commit"]) == 40 and path.stem.endswith(run["commit"][:8])
    assert run["packages"]["torch"] and run["packages"]["llmos"]
    assert run["cpu"]["cores"] >= 1 and run["cpu"]["model"]
    assert run["date"].endswith("Z")


def test_an_existing_result_is_never_replaced(tmp_path: Path) -> None:
    cited = tmp_path / "serve.json"
    cited.write_text('{"rows": "cited in the docs"}')
    first = harness.write_result("serve", {"rows": 1}, cited)
    second = harness.write_result("serve", {"rows": 2}, cited)
    assert cited.read_text() == '{"rows": "cited in the docs"}'
    assert len({cited, first, second}) == 3
    assert json.loads(first.read_text())["rows"] == 1 and json.loads(second.read_text())["rows"] == 2
