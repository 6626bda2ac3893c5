"""`llmos chat` and `llmos embed` against the real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from urllib.parse import urlparse

import pytest

from tests.integration.conftest import ADMIN_KEY, Server

pytestmark = pytest.mark.integration


def _run(server: Server, args: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
    port = str(urlparse(server.url).port)
    env = {**os.environ, "LLMOS_API_KEY": ADMIN_KEY, "LLMOS_PORT": port, "LLMOS_HOME": str(server.home)}
    return subprocess.run(
        [sys.executable, "-m", "llmos", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_embed_prints_vectors_and_similarities(server: Server) -> None:
    result = _run(server, ["embed", "all-minilm-l6-v2", "a cat", "a kitten"])
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [x["dimensions"] for x in lines] == [384, 384]
    assert "cosine(0, 1)" in result.stderr


def test_chat_streams_an_answer(server: Server) -> None:
    result = _run(
        server, ["chat", "smollm2-135m-instruct", "--temperature", "0"], stdin="What is the capital of France?\n\n"
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_chat_with_unknown_model_reports_the_error(server: Server) -> None:
    result = _run(server, ["chat", "no-such-model"], stdin="hi\n\n")
    assert "does not exist" in result.stderr
