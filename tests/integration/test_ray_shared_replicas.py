"""Two API servers on one Ray cluster share one set of engine replicas (ADR 0038): a real two-node
Ray cluster on this machine, two `llmos serve` joined to it on one PostgreSQL database and one data
directory. The replicas the first server places are the ones the second routes to; each server's
cluster view shows that one set, with both servers' streams counted on it; the second server
routes its stream by those counts, to the replica the first left free; and when the first server
stops, the second's stream and requests go on through the same replicas."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from llmos.config import Settings
from llmos.platform import Platform
from tests.integration.conftest import ADMIN_KEY, Server, stop_server
from tests.integration.ray_nodes import Stream, cluster_server, cluster_view, two_node_cluster, wait_for
from tests.postgres import postgres_server
from tests.tiny_models import build_tiny_chat_model

ray = pytest.importorskip("ray", reason='Ray cluster mode needs the ray extra (pip install "llmos[ray]")')

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    home = tmp_path_factory.mktemp("ray-shared")
    model = build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-long"), context=8192)
    with ExitStack() as stack:
        cluster = stack.enter_context(two_node_cluster())
        database = stack.enter_context(postgres_server())
        platform = Platform.open(Settings(home=home, database_url=database))
        platform.registry.pull(f"file:{model}", name="tiny-chat")
        platform.close()
        settings = {
            "database_url": database,
            "max_concurrent_jobs": "0",
            "max_tokens_cap": "8000",
            "ray_min_replicas": "2",
            "ray_replica_cpus": "1",
        }
        first = stack.enter_context(cluster_server(cluster, home, **settings))
        second = stack.enter_context(cluster_server(cluster, home, **settings))
        yield first, second


def _replicas(server: Server) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in cluster_view(server.url, ADMIN_KEY)["replicas"]["data"]}


def _chat(server: Server, text: str) -> httpx.Response:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": text}], "max_tokens": 8}
    return httpx.post(
        f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json=body, timeout=300
    )


def _depths(server: Server) -> dict[str, int]:
    return {replica_id: r["queue_depth"] for replica_id, r in _replicas(server).items()}


def test_both_servers_answer_through_one_replica_set_and_count_each_others_requests(
    servers: tuple[Server, Server],
) -> None:
    first, second = servers
    assert _chat(first, "hello").status_code == 200  # the first server places the model's two replicas
    placed = _replicas(first)
    assert [r["state"] for r in placed.values()] == ["ready", "ready"]
    assert _chat(second, "hello too").status_code == 200  # the second finds them and places none
    assert _replicas(second).keys() == placed.keys()
    assert {r["pid"] for r in _replicas(second).values()} == {r["pid"] for r in placed.values()}
    # Each server counts the other's requests from the replicas' own counts, polled each second: a
    # count of the answer just given may linger that long.
    idle = lambda: all(set(_depths(server).values()) == {0} for server in servers)  # noqa: E731
    wait_for("the answers to leave the counts", idle, 30)

    streams = [Stream(first)]
    try:
        streams[0].started()
        (busy,) = [i for i, depth in _depths(first).items() if depth == 1]
        # the second server learns the first's stream from the replica's own count (polled each second)
        wait_for("the second server to see the first's stream", lambda: _depths(second)[busy] == 1, 30)
        streams.append(Stream(second))
        streams[1].started()
        # routed by those counts, the second server's stream goes to the other replica
        expected = {replica_id: 1 for replica_id in placed}
        assert _depths(second) == expected
        wait_for("the first server to count the second's stream", lambda: _depths(first) == expected, 30)
        running = {i: r["running_requests"] for i, r in _replicas(first).items()}
        assert running == expected, "each replica's engine runs one request"
    finally:
        for stream in streams:
            stream.close()
    wait_for("both streams to end on the replicas", idle, 60)


def test_a_server_that_stops_leaves_the_replicas_to_the_other(servers: tuple[Server, Server]) -> None:
    first, second = servers
    assert _chat(second, "warm").status_code == 200
    before = _replicas(second)
    stream = Stream(second)
    try:
        stream.started()
        assert stop_server(first) == 0
        for _ in range(20):  # the stream goes on after the server that placed its replica stopped
            event = stream.next_event()
            assert event is not None and "error" not in event, event
    finally:
        stream.close()
    after = _replicas(second)
    assert after.keys() == before.keys()
    assert [r["state"] for r in after.values()] == ["ready", "ready"]
    assert _chat(second, "still here?").status_code == 200
