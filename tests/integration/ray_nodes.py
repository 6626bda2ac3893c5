"""A real two-node Ray cluster on this machine for the Ray integration tests: a head and a second
node started with token authentication, each in a session of its own (so a test can kill a node's
processes at once), stopped and removed afterwards."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_server import free_port

RAY = Path(sys.executable).with_name("ray")
LONG = {"max_tokens": 7000, "ignore_eos": True, "temperature": 0}
"""A stream that outlasts a test's steps (the tiny chat model of the Ray tests has a context of 8192)."""


@dataclass
class RayCluster:
    address: str
    node_ip: str
    token: Path
    nodes: list[subprocess.Popen[bytes]]
    """The head, then the second node: each ``ray start --block``, leading its node's process group."""
    logs: Path


def wait_for(what: str, check: Callable[[], Any], timeout: float, nodes: Sequence[subprocess.Popen[bytes]] = ()) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for node in nodes:
            if node.poll() is not None:
                pytest.fail(f"a Ray node exited while waiting for {what}")
        value = check()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}")


def _stop(node: subprocess.Popen[bytes]) -> None:
    """A node started with --block in its own session: its process group is the node's processes."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(node.pid, sig)
        except ProcessLookupError:
            return
        try:
            node.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def two_node_cluster(head_gpus: int | None = None) -> Iterator[RayCluster]:
    """``head_gpus``: GPUs the head advertises, and the second node none (Ray takes the number it is
    given, whether this machine has them or not); None: the GPUs Ray finds on each."""
    from ray._private import services

    root = Path(tempfile.mkdtemp(prefix="llmos-ray-", dir="/tmp"))  # Ray's socket paths must stay short
    token = root / "token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    port = free_port()
    # Ray 2.60 runs a multi-node cluster only on the machine's reachable address (a loopback one is
    # replaced by it), its gRPC servers listening on every interface: token authentication guards them.
    # From the network, not from Ray's in-process state: after a single-machine head in this process
    # (test_ray_cluster's auto head), Ray's answer can be the loopback address it used then.
    node_ip = services.node_ip_address_from_perspective()
    common = ["--block", "--node-ip-address", node_ip, "--num-cpus", "2", "--disable-usage-stats"]
    nodes: list[subprocess.Popen[bytes]] = []

    def start(name: str, *args: str) -> None:
        with (root / f"{name}.log").open("wb") as log:
            nodes.append(
                subprocess.Popen(
                    [str(RAY), "start", *common, *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    try:
        start(
            "head",
            *("--head", "--port", str(port), "--include-dashboard=false", "--temp-dir", str(root / "ray")),
            *(() if head_gpus is None else ("--num-gpus", str(head_gpus))),
        )
        wait_for("the Ray head", lambda: _accepts(node_ip, port), 120, nodes)
        start("node2", "--address", f"{node_ip}:{port}", *(() if head_gpus is None else ("--num-gpus", "0")))
        yield RayCluster(f"{node_ip}:{port}", node_ip, token, nodes, root)
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(root, ignore_errors=True)


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0


def cluster_view(url: str, key: str) -> dict[str, Any]:
    """The server's ``/v1/admin/cluster`` view (nodes, replicas, jobs)."""
    reply = httpx.get(f"{url}/v1/admin/cluster", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    reply.raise_for_status()
    return dict(reply.json())


@contextmanager
def cluster_server(cluster: RayCluster, home: Path, **settings: str) -> Iterator[Any]:
    """An API server of ``home`` joined to ``cluster`` (this machine's address, by consent, and the
    cluster's token), with ``settings`` beside; yielded once it sees both nodes alive."""
    from tests.integration.conftest import ADMIN_KEY, start_server, stop_server

    server = start_server(
        home,
        default_models="[]",
        dtype="float32",
        ray_address=cluster.address,
        ray_bind_host=cluster.node_ip,
        ray_allow_remote_bind="true",
        ray_auth_token_file=str(cluster.token),
        **settings,
    )
    try:
        alive = lambda: [n for n in cluster_view(server.url, ADMIN_KEY)["nodes"]["data"] if n["alive"]]  # noqa: E731
        wait_for("both Ray nodes", lambda: len(alive()) == 2, 120)
        yield server
    finally:
        assert stop_server(server) == 0


@contextmanager
def job_server(cluster: RayCluster, home: Path, chat_dir: Path) -> Iterator[Any]:
    """A server of ``home`` joined to ``cluster`` that runs one fine-tuning job at a time, each
    reserving 1 CPU and 256 MB, with the chat model of ``chat_dir`` registered as ``tiny-chat``."""
    from llmos.config import Settings
    from llmos.platform import Platform

    platform = Platform.open(Settings(home=home))
    platform.registry.pull(f"file:{chat_dir}", name="tiny-chat")
    platform.close()
    with cluster_server(cluster, home, max_concurrent_jobs="1", ray_job_cpus="1", ray_job_memory_mb="256") as server:
        yield server


class Stream:
    """A streamed chat completion read event by event."""

    def __init__(self, server: Any) -> None:
        from tests.integration.conftest import ADMIN_KEY

        self._client = httpx.Client(timeout=120)
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "go"}], "stream": True, **LONG}
        request = self._client.build_request(
            "POST", f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, json=body
        )
        self._response = self._client.send(request, stream=True)
        assert self._response.status_code == 200
        self._lines = self._response.iter_lines()

    def next_event(self) -> dict[str, Any] | None:
        for line in self._lines:
            if line.startswith("data: "):
                payload = line.removeprefix("data: ")
                return None if payload == "[DONE]" else dict(json.loads(payload))
        return None

    def started(self) -> None:
        """Read until the first generated text: the request is then on a replica (the opening chunk,
        the assistant's role, is sent before the engine is asked)."""
        while (event := self.next_event()) is not None:
            if "error" in event:
                pytest.fail(f"the stream failed: {event}")
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                return
        pytest.fail("the stream ended before any text")

    def close(self) -> None:
        self._response.close()
        self._client.close()
