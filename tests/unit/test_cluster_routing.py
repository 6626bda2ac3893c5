"""Ray cluster mode's rules that need no Ray: replica routing with adapter affinity, replica
placement on nodes, the settings that keep Ray's ports on loopback, and the admin view's shape."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from llmos.api import create_app
from llmos.cluster.routing import (
    NodeCapacity,
    ReplicaLoad,
    ReplicaNeed,
    Reservation,
    choose_node,
    choose_replica,
)
from llmos.cluster.view import ClusterEngine, ClusterView, NodeView, ReplicaView
from llmos.config import Settings
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.fake_engine import FakeEngine

GB = 1 << 30


def test_base_model_requests_go_to_the_least_busy_replica() -> None:
    replicas = [ReplicaLoad("a", 3), ReplicaLoad("b", 1), ReplicaLoad("c", 2)]
    assert choose_replica(replicas, None, overload=4).replica_id == "b"


def test_an_adapter_request_goes_to_a_replica_holding_it_even_when_busier() -> None:
    replicas = [ReplicaLoad("a", 0), ReplicaLoad("b", 3, frozenset({"lora-1"})), ReplicaLoad("c", 2)]
    assert choose_replica(replicas, "lora-1", overload=4).replica_id == "b"


def test_an_overloaded_holder_is_passed_over_for_the_least_busy() -> None:
    replicas = [ReplicaLoad("a", 1), ReplicaLoad("b", 4, frozenset({"lora-1"})), ReplicaLoad("c", 2)]
    assert choose_replica(replicas, "lora-1", overload=4).replica_id == "a"


def test_among_holders_the_least_busy_one_wins() -> None:
    holds = frozenset({"lora-1"})
    replicas = [ReplicaLoad("a", 0), ReplicaLoad("b", 2, holds), ReplicaLoad("c", 1, holds)]
    assert choose_replica(replicas, "lora-1", overload=4).replica_id == "c"


def test_no_replica_is_an_error() -> None:
    with pytest.raises(ValueError, match="no replica"):
        choose_replica([], None, overload=4)


def _nodes() -> list[NodeCapacity]:
    return [NodeCapacity("n1", "10.0.0.1", cpus=4, memory_bytes=8 * GB), NodeCapacity("n2", "10.0.0.2", 4, 4 * GB)]


def test_a_new_model_goes_to_the_node_with_the_most_free_memory() -> None:
    assert choose_node(_nodes(), {}, ReplicaNeed(1, GB), "m").node_id == "n1"


def test_replicas_of_one_model_spread_before_filling_a_node() -> None:
    held = {"n1": Reservation(cpus=1, memory_bytes=GB, models=["m"])}
    assert choose_node(_nodes(), held, ReplicaNeed(1, GB), "m").node_id == "n2"
    # another model does not count against the spread
    assert choose_node(_nodes(), held, ReplicaNeed(1, GB), "other").node_id == "n1"


def test_a_node_without_room_is_skipped_and_none_fits_gives_none() -> None:
    held = {"n1": Reservation(cpus=3.5, memory_bytes=GB, models=["x"])}
    assert choose_node(_nodes(), held, ReplicaNeed(1, GB), "m").node_id == "n2"
    assert choose_node(_nodes(), {}, ReplicaNeed(1, 9 * GB), "m") is None
    assert choose_node(_nodes(), {}, ReplicaNeed(1, GB, gpus=1), "m") is None  # no node has a GPU
    gpu_node = NodeCapacity("g", "10.0.0.3", 8, 16 * GB, gpus=1)
    assert choose_node([*_nodes(), gpu_node], {}, ReplicaNeed(1, GB, gpus=1), "m") == gpu_node


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "ray-head.internal"])
def test_settings_refuse_a_non_loopback_ray_bind_without_the_explicit_setting(host: str) -> None:
    with pytest.raises(ValidationError, match="ray_allow_remote_bind"):
        Settings(ray_address="auto", ray_bind_host=host)
    assert Settings(ray_address="auto", ray_bind_host=host, ray_allow_remote_bind=True).ray_bind_host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_ray_binds_are_accepted(host: str) -> None:
    assert Settings(ray_address="auto", ray_bind_host=host).ray_bind_host == host


def test_the_in_process_engine_is_not_a_cluster_engine() -> None:
    assert not isinstance(FakeEngine(), ClusterEngine)


class _FakeClusterEngine(FakeEngine):
    async def cluster_view(self) -> ClusterView:
        node = NodeView("n1", "127.0.0.1", True, {"CPU": 2.0, "memory": float(GB)})
        replica = ReplicaView("replica-1", "tiny-chat", "n1", 2, ["tiny-lora"], "ready", pid=4242)
        return ClusterView("127.0.0.1:6379", [node], [replica], server_node="n1")


def test_the_cluster_view_is_for_admins(loaded_platform: Platform) -> None:
    with TestClient(create_app(platform=loaded_platform, engine=_FakeClusterEngine())) as http:
        _, secret = loaded_platform.keys.create("app", scopes=("inference",))
        assert http.get("/v1/admin/cluster", headers={"Authorization": f"Bearer {secret}"}).status_code == 403


def test_the_cluster_view_lists_nodes_and_replicas(loaded_platform: Platform) -> None:
    with TestClient(create_app(platform=loaded_platform, engine=_FakeClusterEngine())) as http:
        body = http.get("/v1/admin/cluster", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()
    assert (body["object"], body["mode"], body["server_node_id"]) == ("cluster", "ray", "n1")
    assert body["nodes"]["object"] == "list"
    assert body["nodes"]["data"][0] == {
        "object": "cluster.node",
        "id": "n1",
        "address": "127.0.0.1",
        "alive": True,
        "resources": {"CPU": 2.0, "memory": float(GB)},
        "available": None,
        "gpus": [],  # in Ray mode a node's GPUs are only counted, in its resources
    }
    replica = body["replicas"]["data"][0]
    assert replica["model"] == "tiny-chat"
    assert (replica["node_id"], replica["queue_depth"], replica["adapters"]) == ("n1", 2, ["tiny-lora"])
    assert (replica["state"], replica["pid"]) == ("ready", 4242)
