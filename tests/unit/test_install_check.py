"""A run that skipped the llama.cpp backend's tests because llama-cpp-python is missing fails,
with a banner in its summary, unless the missing backend is accepted on purpose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFTEST = """
from tests import install_check
from tests.install_check import pytest_sessionfinish, pytest_terminal_summary

install_check.BACKEND_MODULE = "llama_cpp_that_is_not_installed"
"""
NEEDS_BACKEND = """
import pytest

pytest.importorskip("llama_cpp_that_is_not_installed", reason="the llama.cpp backend needs llama-cpp-python")


def test_backend() -> None:
    pass
"""


def run(directory: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if k != "LLMOS_ALLOW_MISSING_LLAMACPP"}
    # No plugins from entry points: the run needs only pytest and the hooks under test.
    environment.update(PYTHONPATH=str(ROOT), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", **env)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(directory),
        str(directory),
    ]
    return subprocess.run(command, cwd=directory, env=environment, capture_output=True, text=True, timeout=120)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_plain.py").write_text("def test_plain() -> None:\n    pass\n")
    return tmp_path


def test_a_skipped_backend_fails_the_run_loudly(project: Path) -> None:
    (project / "test_backend.py").write_text(NEEDS_BACKEND)
    done = run(project)
    assert done.returncode == 1, done.stdout
    assert "THE LLAMA.CPP BACKEND IS NOT INSTALLED" in done.stdout
    assert "set LLMOS_ALLOW_MISSING_LLAMACPP=1" in done.stdout

    accepted = run(project, LLMOS_ALLOW_MISSING_LLAMACPP="1")
    assert accepted.returncode == 0, accepted.stdout
    assert "THE LLAMA.CPP BACKEND IS NOT INSTALLED" in accepted.stdout  # still said, not failed


def test_a_run_without_the_backend_tests_says_nothing(project: Path) -> None:
    done = run(project)
    assert done.returncode == 0, done.stdout
    assert "LLAMA.CPP" not in done.stdout
