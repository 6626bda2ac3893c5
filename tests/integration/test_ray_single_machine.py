"""Ray on one machine: an automatic head listens on loopback only, with an owner-only token, and
serving refuses to bind Ray beyond loopback unless allowed.

In a file of its own, run after the two-node tests (test_ray_cluster.py, test_ray_jobs.py): the
automatic head is started inside the test process, and after it a two-node cluster started by the
same process did not get both of its nodes up (Ray's in-process state, not the environment,
which the test restores)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmos.config import Settings

ray = pytest.importorskip("ray", reason='Ray cluster mode needs the ray extra (pip install "llmos[ray]")')

pytestmark = pytest.mark.integration


def test_serve_refuses_to_bind_ray_beyond_loopback_unless_allowed(tmp_path: Path) -> None:
    env = {**os.environ, "LLMOS_HOME": str(tmp_path), "LLMOS_RAY_ADDRESS": "auto", "LLMOS_RAY_BIND_HOST": "0.0.0.0"}
    run = subprocess.run(
        [sys.executable, "-m", "llmos", "serve", "--no-pull"],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert b"ray_allow_remote_bind" in run.stdout + run.stderr


def test_an_auto_head_listens_on_loopback_only_with_an_owner_only_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psutil
    from ray._private import ray_constants

    from llmos.cluster.connect import SINGLE_MACHINE_ENV, connect, disconnect

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", SINGLE_MACHINE_ENV):
        monkeypatch.delenv(name, raising=False)  # connect sets them; put back as they were afterwards
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", ray_constants.ENABLE_RAY_CLUSTER)
    settings = Settings(home=tmp_path, ray_address="auto")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    session = connect(settings)
    try:
        assert session.started_head
        assert settings.ray_token_path.stat().st_mode & 0o777 == 0o600
        assert os.environ["RAY_AUTH_MODE"] == "token"
        ray_processes = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        listening = [
            c.laddr for p in ray_processes for c in _connections(p) if c.status == psutil.CONN_LISTEN and c.laddr
        ]
        assert listening, "the head's processes listen somewhere"
        assert {address.ip for address in listening} <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, listening
        assert ray.cluster_resources()["CPU"] >= 1
    finally:
        disconnect()


def _connections(process: Any) -> list[Any]:
    import psutil

    try:
        return list(process.net_connections(kind="inet"))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
