"""The console's Cluster page in a real browser (Debian's chromium, never `playwright install`): it
shows what ``/v1/admin/cluster`` returns and follows it as it changes, in Ray cluster mode (the
view faked at the engine; the real two-node cluster is tests/integration/test_ray_cluster.py) and
in single-process mode (this machine); a session without the admin scope has no such page."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from llmos.cluster.view import ClusterView, EngineCounts, NodeView, ReplicaView
from llmos.config import Settings
from llmos.kernel.job_workers import LOCAL, Placement
from llmos.platform import Platform
from tests.browser.chromium import NEEDS_CHROMIUM, signed_in, sync_api
from tests.conftest import ADMIN_KEY
from tests.fake_engine import FakeEngine
from tests.live_server import Server, free_port, serving_platform

pytestmark = NEEDS_CHROMIUM
WAIT_MS = 30_000
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
GB = 1 << 30


@dataclass
class _ClusterEngine(FakeEngine):
    """A Ray cluster as the engine reports it: the test changes ``replicas`` and the page follows."""

    replicas: list[ReplicaView] = field(default_factory=list)

    async def cluster_view(self) -> ClusterView:
        nodes = [
            NodeView(
                "n-head",
                "10.0.0.1",
                True,
                {"CPU": 8.0, "GPU": 0.0, "memory": 16.0 * GB},
                {"CPU": 3.0, "GPU": 0.0, "memory": 4.0 * GB},
            ),
            NodeView(
                "n-gpu",
                "10.0.0.2",
                True,
                {"CPU": 4.0, "GPU": 1.0, "memory": 8.0 * GB},
                {"CPU": 4.0, "GPU": 1.0, "memory": 8.0 * GB},
            ),
            NodeView("n-gone", "10.0.0.3", False, {"CPU": 2.0, "memory": 2.0 * GB}),
        ]
        return ClusterView("10.0.0.1:6379", nodes, list(self.replicas), server_node="n-head")


def _replica(replica_id: str, node: str, running: int, waiting: int, tokens: int) -> ReplicaView:
    counts = EngineCounts(pending=running + waiting, running=running, waiting=waiting, tokens_generated=tokens)
    return ReplicaView(replica_id, "tiny-chat", node, running + waiting, ["tiny-lora"], "ready", 4242, counts)


@dataclass
class _Supervisor:
    """Stands for the job supervisor: the route lists the jobs whose workers it runs, each where
    it was placed."""

    placements: dict[str, Placement]


@contextlib.contextmanager
def _serve(home: Path, engine: FakeEngine) -> Iterator[Server]:
    settings = Settings(
        home=home, admin_key=ADMIN_KEY, host="127.0.0.1", port=free_port(), allowed_hosts=[], max_concurrent_jobs=0
    )
    with serving_platform(settings, engine) as server:
        yield server


def _signed_in(browser: Any, url: str, key: str = ADMIN_KEY) -> Any:
    return signed_in(browser, url, WAIT_MS, key)


def _rows(page: Any, container: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in row.locator("td").all_inner_texts()]
        for row in page.locator(f"#{container} tbody tr").all()
    ]


def _cluster(url: str) -> dict[str, Any]:
    reply = httpx.get(f"{url}/v1/admin/cluster", headers=AUTH, timeout=30)
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


def _queued_jobs(url: str, tiny_chat_dir: Path, platform: Platform, count: int) -> list[str]:
    platform.registry.pull(f"file:{tiny_chat_dir}", name="tiny-chat")
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}] * 12
    data = "\n".join(json.dumps(r) for r in rows).encode()
    upload = httpx.post(
        f"{url}/v1/files", headers=AUTH, files={"file": ("t.jsonl", data)}, data={"purpose": "fine-tune"}, timeout=30
    )
    body = {"model": "tiny-chat", "training_file": upload.json()["id"]}
    return [
        str(httpx.post(f"{url}/v1/fine_tuning/jobs", headers=AUTH, json=body, timeout=30).json()["id"])
        for _ in range(count)
    ]


def test_the_page_shows_the_ray_clusters_nodes_replicas_and_jobs_and_follows_them(
    browser: Any, tmp_path: Path, tiny_chat_dir: Path
) -> None:
    engine = _ClusterEngine(
        replicas=[_replica("replica-a", "n-head", 2, 1, 40), _replica("replica-b", "n-gpu", 0, 0, 7)]
    )
    with _serve(tmp_path / "home", engine) as server:
        job, on_gpu = _queued_jobs(server.url, tiny_chat_dir, server.platform, 2)
        # One worker runs on this server's node (reserving nothing), one on the GPU node with its reservation.
        server.app.state.supervisor = _Supervisor({job: LOCAL, on_gpu: Placement("n-gpu", "10.0.0.2", 3 << 30, 1.0)})
        view = _cluster(server.url)
        page = _signed_in(browser, server.url)
        page.goto(f"{server.url}/ui/cluster")
        sync_api.expect(page.locator("#cluster-mode")).to_have_text(
            "Ray cluster mode: 2 of 3 nodes alive, cluster address 10.0.0.1:6379."
        )
        sync_api.expect(page.locator("#cluster-nodes tbody tr")).to_have_count(len(view["nodes"]["data"]))
        assert _rows(page, "cluster-nodes") == [
            ["10.0.0.1 (this server)", "n-head", "yes", "3 / 8", "0 / 0", "4.0 GB / 16.0 GB"],
            ["10.0.0.2", "n-gpu", "yes", "4 / 4", "1 / 1", "8.0 GB / 8.0 GB"],
            ["10.0.0.3", "n-gone", "no", "2", "-", "2.0 GB"],
        ]
        expected = [
            [r["id"], r["model"], {"n-head": "10.0.0.1", "n-gpu": "10.0.0.2"}[r["node_id"]], r["state"]]
            + [str(r[k]) for k in ("queue_depth", "requests_running", "requests_waiting", "tokens_generated")]
            + [", ".join(r["adapters"]), str(r["pid"])]
            for r in view["replicas"]["data"]
        ]
        assert _rows(page, "cluster-replicas") == expected
        assert expected[0][:8] == ["replica-a", "tiny-chat", "10.0.0.1", "ready", "3", "2", "1", "40"]
        assert _rows(page, "cluster-jobs") == [
            [job, "tiny-chat", "default", "queued", "10.0.0.1", "-", "-"],
            [on_gpu, "tiny-chat", "default", "queued", "10.0.0.2", "3.0 GB", "1"],
        ]

        # The page polls: a replica lost and another busier shows without a reload.
        engine.replicas = [_replica("replica-a", "n-head", 5, 4, 90)]
        sync_api.expect(page.locator("#cluster-replicas tbody tr")).to_have_count(1)
        sync_api.expect(page.locator("#cluster-replicas tbody tr").first).to_contain_text("90")
        assert _rows(page, "cluster-replicas")[0][4:8] == ["9", "5", "4", "90"]


@dataclass
class _InProcessEngine(FakeEngine):
    def stats(self) -> dict[str, Any]:
        runner = {"name": "tiny-chat", "requests_running": 1, "requests_waiting": 0, "tokens_generated": 12}
        return {"pending_requests": 1, "models": {"m-1": runner}}


def test_in_single_process_mode_the_page_says_so_and_shows_this_machine(browser: Any, tmp_path: Path) -> None:
    with _serve(tmp_path / "home", _InProcessEngine()) as server:
        node = _cluster(server.url)["nodes"]["data"][0]
        page = _signed_in(browser, server.url)
        page.goto(f"{server.url}/ui/cluster")
        sync_api.expect(page.locator("#cluster-mode")).to_contain_text("Single-process mode: Ray cluster mode is off")
        sync_api.expect(page.locator("#cluster-nodes tbody tr")).to_have_count(1)
        [row] = _rows(page, "cluster-nodes")
        assert row[:3] == [f"{socket.gethostname()} (this server)", "local", "yes"]
        assert row[3].endswith(f" / {node['resources']['CPU']:g}")
        [replica] = _rows(page, "cluster-replicas")
        assert replica[1:8] == ["tiny-chat", socket.gethostname(), "ready", "-", "1", "0", "12"]
        sync_api.expect(page.locator("#cluster-jobs")).to_have_text("No job runs on this server's node.")
        assert page.locator("#notice").inner_text() == ""  # no error shown


def test_a_session_without_admin_has_no_cluster_page(browser: Any, tmp_path: Path) -> None:
    with _serve(tmp_path / "home", _ClusterEngine()) as server:
        server.platform.tenants.create("acme")
        _, key = server.platform.keys.create("acme-ops", tenant="acme", scopes=("inference", "models", "metrics"))
        page = _signed_in(browser, server.url, key)
        sync_api.expect(page.get_by_role("link", name="Overview")).to_be_visible()
        sync_api.expect(page.get_by_role("link", name="Cluster")).to_have_count(0)
        response = page.goto(f"{server.url}/ui/cluster")
        assert response.status == 403
        assert page.locator("#cluster-nodes").count() == 0
        refused = page.evaluate("fetch('/v1/admin/cluster').then(r => r.status)")
        assert refused == 403
