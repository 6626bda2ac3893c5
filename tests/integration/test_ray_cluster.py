"""Ray cluster mode (issue 21 point 1, ADR 0029) on a real two-node Ray cluster on this machine: a
head and a second node started here with token authentication, `llmos serve` joined to it with two
replicas of a tiny chat model. Two replicas answer (on the two nodes) and report their own counts
(the admin view, the per-replica metrics), a client that leaves frees its row on the replica, and
a replica killed mid-stream ends that stream with an error event while the next requests go to the
other replica and a replacement is placed. An `auto` head listens on loopback only; a non-loopback
bind needs the explicit setting."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmos.config import Settings
from llmos.platform import Platform
from tests.integration.conftest import ADMIN_KEY, Server
from tests.integration.ray_nodes import (
    RayCluster,
    Stream,
    cluster_server,
    cluster_view,
    two_node_cluster,
    wait_for,
)
from tests.tiny_models import build_tiny_chat_model

ray = pytest.importorskip("ray", reason='Ray cluster mode needs the ray extra (pip install "llmos[ray]")')

pytestmark = pytest.mark.integration

AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    with two_node_cluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def server(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("ray-server")
    model = build_tiny_chat_model(tmp_path_factory.mktemp("tiny-chat-long"), context=8192)
    platform = Platform.open(Settings(home=home))
    platform.registry.pull(f"file:{model}", name="tiny-chat")
    platform.close()
    with cluster_server(
        ray_cluster, home, max_concurrent_jobs="0", max_tokens_cap="8000", ray_min_replicas="2", ray_replica_cpus="1"
    ) as server:
        yield server


def _cluster(server: Server) -> dict[str, Any]:
    return cluster_view(server.url, ADMIN_KEY)


def _replicas(server: Server) -> list[dict[str, Any]]:
    return list(_cluster(server)["replicas"]["data"])


def _chat(server: Server, text: str, **extra: Any) -> httpx.Response:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}
    return httpx.post(f"{server.url}/v1/chat/completions", headers=AUTH, json=body, timeout=300)


def test_two_replicas_on_two_nodes_answer(server: Server) -> None:
    assert _chat(server, "hello").status_code == 200  # places the model's two replicas
    replicas = _replicas(server)
    assert [r["state"] for r in replicas] == ["ready", "ready"]
    assert len({r["node_id"] for r in replicas}) == 2, "the two replicas of one model spread over both nodes"
    streams = [Stream(server), Stream(server)]
    try:
        for stream in streams:
            stream.started()
        # the least busy replica takes each new request: one stream on each
        assert sorted(r["queue_depth"] for r in _replicas(server)) == [1, 1]
        assert sorted(r["running_requests"] for r in _replicas(server)) == [1, 1]
    finally:
        for stream in streams:
            stream.close()


def test_the_view_and_the_metrics_show_each_replicas_own_counts(server: Server) -> None:
    assert _chat(server, "count me").status_code == 200
    # The replica's engine ends its last step just after the answer's last token is sent.
    wait_for("the replica to end its step", lambda: sum(r["running_requests"] for r in _replicas(server)) == 0, 30)
    view = _cluster(server)  # asks each replica for its counts, which the next scrape reads too
    assert view["mode"] == "ray"
    nodes = {n["id"]: n for n in view["nodes"]["data"]}
    assert view["server_node_id"] in nodes
    for node in nodes.values():
        assert 0 <= node["available"]["CPU"] <= node["resources"]["CPU"]
    replicas = view["replicas"]["data"]
    assert sum(r["tokens_generated"] for r in replicas) >= 1
    scrape = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30).text
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(scrape)
        for s in family.samples
    }
    for replica in replicas:
        labels = {"model_name": "tiny-chat", "replica": replica["id"], "node": nodes[replica["node_id"]]["address"]}
        key = frozenset(labels.items())
        assert samples[("llmos_replica_generation_tokens_total", key)] == replica["tokens_generated"]
        assert samples[("llmos_replica_num_requests_running", key)] == 0


def test_a_client_that_leaves_frees_its_row_on_the_replica(server: Server) -> None:
    stream = Stream(server)
    stream.started()
    assert sum(r["running_requests"] for r in _replicas(server)) == 1
    stream.close()  # thousands of tokens still to go: only the abort ends it
    wait_for("the replica to drop the request", lambda: sum(r["running_requests"] for r in _replicas(server)) == 0, 60)
    assert sum(r["queue_depth"] for r in _replicas(server)) == 0


def test_a_replica_killed_mid_stream_fails_that_stream_and_the_other_serves(server: Server) -> None:
    wait_for("two ready replicas", lambda: [r["state"] for r in _replicas(server)] == ["ready", "ready"], 180)
    stream = Stream(server)
    try:
        stream.started()
        (victim,) = [r for r in _replicas(server) if r["queue_depth"] == 1]
        os.kill(victim["pid"], signal.SIGKILL)
        events = []
        while (event := stream.next_event()) is not None:
            events.append(event)
        assert "error" in events[-1], "the stream ends with an error event, not [DONE]"
        assert events[-1]["error"]["code"] == "engine_error"
        assert "replica" in events[-1]["error"]["message"]
    finally:
        stream.close()
    replicas = _replicas(server)
    assert victim["id"] not in [r["id"] for r in replicas]
    survivor = next(r for r in replicas if r["state"] == "ready")
    stream = Stream(server)  # the next request goes to the replica that is left
    try:
        stream.started()
        assert next(r for r in _replicas(server) if r["id"] == survivor["id"])["queue_depth"] == 1
    finally:
        stream.close()
    reply = _chat(server, "still there?")
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"
    # the pool places a replacement; the model is back to two replicas
    wait_for("a replacement replica", lambda: [r["state"] for r in _replicas(server)] == ["ready", "ready"], 180)
    assert len({r["node_id"] for r in _replicas(server)}) == 2
