"""The HTTP server `llmos serve` runs, on real sockets: slow or idle clients are cut off and cannot
keep a normal request from being answered; the response headers do not name the stack."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest

from llmos.api import create_app
from llmos.config import Settings
from llmos.platform import Platform
from tests.live_server import free_port, serving

SLOW_SOCKETS = 6


@contextmanager
def running_server(platform: Platform, **overrides: object) -> Iterator[Settings]:
    """`llmos serve`'s server on a free loopback port, in a thread, with short timeouts."""
    limits = {
        "http_header_timeout_s": 0.5,
        "http_body_timeout_s": 0.5,
        "http_keep_alive_s": 1,
        "http_max_connections": 64,
        "http_max_header_bytes": 4096,
    }
    settings = platform.settings.model_copy(
        update={"host": "127.0.0.1", "port": free_port(), "allowed_hosts": [], **limits, **overrides}
    )
    with serving(create_app(settings, platform=platform), settings):
        yield settings


@pytest.fixture
def server(platform: Platform) -> Iterator[Settings]:
    with running_server(platform) as settings:
        yield settings


def _connect(settings: Settings, first_bytes: bytes) -> socket.socket:
    sock = socket.create_connection((settings.host, settings.port), timeout=5)
    sock.sendall(first_bytes)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends before it closes the connection (a timeout fails the test)."""
    received = b""
    while chunk := sock.recv(4096):
        received += chunk
    return received


def test_slow_clients_are_cut_off_and_never_block_a_normal_request(server: Settings) -> None:
    base = f"http://{server.host}:{server.port}"
    host = f"Host: 127.0.0.1:{server.port}\r\n".encode()
    slow_heads = [_connect(server, b"GET /health HTTP/1.1\r\n" + host) for _ in range(SLOW_SOCKETS)]
    slow_bodies = [
        _connect(
            server,
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + host
            + b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model"',
        )
        for _ in range(SLOW_SOCKETS)
    ]
    with httpx.Client(base_url=base) as client:
        answer = client.get("/health", timeout=5)
    assert answer.status_code == 200
    assert "server" not in answer.headers and "date" in answer.headers
    for sock in slow_heads:  # no request head within the timeout: closed without an answer
        assert _read_until_closed(sock) == b""
        sock.close()
    for sock in slow_bodies:  # a body that stops arriving: 408 in the API's error shape
        reply = _read_until_closed(sock)
        assert reply.startswith(b"HTTP/1.1 408") and b'"code": "request_timeout"' in reply, reply[:300]
        sock.close()


def test_an_oversized_request_head_is_refused(server: Settings) -> None:
    # A head still growing past http_max_header_bytes (what would otherwise buffer without end).
    sock = _connect(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 8192)
    assert _read_until_closed(sock).startswith(b"HTTP/1.1 400")
    sock.close()


def test_connections_beyond_the_cap_are_refused_at_once(platform: Platform) -> None:
    with running_server(platform, http_max_connections=3, http_header_timeout_s=30.0) as settings:
        held = [_connect(settings, b"") for _ in range(3)]
        time.sleep(0.2)  # the server has taken them
        extra = _connect(settings, b"")
        reply = _read_until_closed(extra)
        assert reply.startswith(b"HTTP/1.1 503") and b'"code": "overloaded"' in reply, reply[:300]
        for sock in held:
            sock.close()
        time.sleep(0.2)
        with httpx.Client(base_url=f"http://{settings.host}:{settings.port}") as client:
            assert client.get("/health", timeout=5).status_code == 200  # room again once they left
        extra.close()


def test_docs_pages_are_off_unless_enabled(platform: Platform) -> None:
    from fastapi.testclient import TestClient

    with TestClient(create_app(platform=platform)) as http:
        assert http.get("/docs").status_code == 404
        assert http.get("/openapi.json").status_code == 200
    enabled = platform.settings.model_copy(update={"docs_enabled": True})
    with TestClient(create_app(enabled, platform=platform)) as http:
        assert http.get("/docs").status_code == 200
