"""Work stops when its client leaves: a real server process (``llmos serve``) on loopback with the
tiny chat model, and clients that give up mid-generation, streamed or not."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.config import Settings
from llmos.platform import Platform
from tests.integration.conftest import ADMIN_KEY, Server, start_server, stop_server

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
MAX_TOKENS = 4000
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea and the stars."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_chat_dir: Path) -> Iterator[Server]:
    # The tiny model with room for thousands of tokens (Llama's weights do not depend on the
    # context length), so that an unabandoned request would run far longer than the test waits.
    model_dir = tmp_path_factory.mktemp("long-tiny-chat")
    shutil.copytree(tiny_chat_dir, model_dir, dirs_exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    config["max_position_embeddings"] = MAX_TOKENS + 96
    (model_dir / "config.json").write_text(json.dumps(config))
    home = tmp_path_factory.mktemp("disconnect-home")
    platform = Platform.open(Settings(home=home))
    platform.registry.pull(f"file:{model_dir}", name="tiny-chat")
    platform.close()
    srv = start_server(home, default_models="[]", dtype="float32", batch_wait_ms="0")
    try:
        warm = {"model": "tiny-chat", "messages": MESSAGES, "max_tokens": 2}
        httpx.post(f"{srv.url}/v1/chat/completions", headers=AUTH, json=warm, timeout=120).raise_for_status()
        yield srv
    finally:
        stop_server(srv)


def engine_stats(server: Server) -> tuple[int, int]:
    """Requests the engine holds, and tokens it has generated so far."""
    stats = httpx.get(f"{server.url}/v1/admin/engine", headers=AUTH, timeout=10).json()
    return stats["pending_requests"], sum(m.get("tokens_generated", 0) for m in stats["models"].values())


def completion_tokens_charged(server: Server) -> int:
    rows = httpx.get(f"{server.url}/v1/usage", headers=AUTH, timeout=10).json()["data"]
    return sum(row["completion_tokens"] for row in rows)


def abandon(server: Server, path: str, body: dict[str, Any]) -> None:
    """Send ``body`` and leave before the answer: a streamed one after a few events, a whole one
    when the client's read timeout fires (the connection is closed either way)."""
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=httpx.Timeout(30, read=1.0)) as client:
        if body.get("stream"):
            with client.stream("POST", path, json=body) as resp:
                for i, _ in enumerate(resp.iter_lines()):
                    if i >= 3:
                        break
        else:
            with pytest.raises(httpx.ReadTimeout):
                client.post(path, json=body)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": MESSAGES}),
        ("/v1/completions", {"prompt": "The sea and the stars", "n": 2}),
        ("/v1/chat/completions", {"messages": MESSAGES, "stream": True}),
    ],
    ids=["chat", "completion", "chat-stream"],
)
def test_a_request_whose_client_leaves_is_aborted_and_charged(server: Server, path: str, body: dict) -> None:
    body = {"model": "tiny-chat", "max_tokens": MAX_TOKENS, "temperature": 0, **body}
    _, generated_before = engine_stats(server)
    charged_before = completion_tokens_charged(server)
    abandon(server, path, body)
    deadline = time.monotonic() + 10  # generous: the abort lands at the engine's next step
    while (pending := engine_stats(server)[0]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pending == 0, "the abandoned request is still in the engine"
    time.sleep(0.5)  # the step that was running when the abort arrived may still finish
    _, settled = engine_stats(server)
    time.sleep(1.0)
    assert engine_stats(server)[1] == settled, "tokens are still being generated for nobody"
    generated = settled - generated_before
    assert 0 < generated < body.get("n", 1) * MAX_TOKENS  # cut short, not run to max_tokens
    charged = completion_tokens_charged(server) - charged_before
    assert 0 < charged <= generated  # what was generated (and reached the API) is charged
