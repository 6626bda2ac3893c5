"""An app served by uvicorn on a thread of the test process, on loopback, for tests that need a
real HTTP server (sockets, timeouts, a browser) rather than an in-process client."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from llmos.api import create_app
from llmos.api.server import server_config
from llmos.config import Settings
from llmos.platform import Platform


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(app: Any, settings: Settings) -> Iterator[str]:
    """``app`` served as ``llmos serve`` would with ``settings`` until the block ends; yields its URL."""
    server = uvicorn.Server(server_config(app, settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://{settings.host}:{settings.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@dataclass
class Server:
    url: str
    app: Any
    platform: Platform


@contextlib.contextmanager
def serving_platform(settings: Settings, engine: Any) -> Iterator[Server]:
    """A platform opened on ``settings`` and its app with ``engine``, served on loopback; closed after."""
    platform = Platform.open(settings)
    app = create_app(settings, platform=platform, engine=engine)
    try:
        with serving(app, settings) as url:
            yield Server(url, app, platform)
    finally:
        platform.close()
