"""Fine-tuning jobs that ask for GPUs (issue 21, docs/scaling.md "GPUs for jobs"), without Ray: the
job's own ``gpus`` or the server's ``ray_job_gpus``, the node chosen by its free GPUs (those Ray
reports, less the ones of workers still starting there), the ``NoRoom`` that names the GPU, Ray's
``num_gpus`` in the actor's options, and the trainer's device falling back to the CPU when its
worker sees no CUDA device."""

from __future__ import annotations

import json
import types
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from llmos.cluster.routing import NodeCapacity, ReplicaNeed, choose_job_node
from llmos.config import Settings
from llmos.errors import InvalidRequestError
from llmos.kernel.job_workers import NoRoom, Placement, job_gpus
from llmos.platform import Platform
from llmos.training.device import training_device
from tests.conftest import ADMIN_KEY

GB = 1 << 30
ROWS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]} for i in range(4)]


def test_a_job_asking_for_a_gpu_goes_only_to_a_node_with_one_free() -> None:
    need = ReplicaNeed(cpus=1.0, memory_bytes=GB, gpus=1.0)
    server = NodeCapacity("head", "10.0.0.1", cpus=4, memory_bytes=8 * GB, gpus=1.0)
    cpu_only = NodeCapacity("cpu", "10.0.0.2", cpus=8, memory_bytes=8 * GB)
    taken = NodeCapacity("taken", "10.0.0.3", cpus=8, memory_bytes=8 * GB, gpus=0.5)  # half reserved already
    # The server's own node, though the rule prefers another, is the only one with a whole GPU free.
    assert choose_job_node([server, cpu_only, taken], need, "head") == server
    assert choose_job_node([cpu_only, taken], need, "head") is None
    half = ReplicaNeed(cpus=1.0, memory_bytes=GB, gpus=0.5)
    assert choose_job_node([server, cpu_only, taken], half, "head") == taken  # not the server's, more CPUs
    assert choose_job_node([cpu_only], ReplicaNeed(cpus=1.0, memory_bytes=GB), "head") == cpu_only


def _job(gpus: float | None = None, memory: int = GB) -> Any:
    return types.SimpleNamespace(method={"memory_bytes": memory, "resolved": {"gpus": gpus}})


def test_a_jobs_own_gpus_win_over_the_servers_setting() -> None:
    settings = Settings(ray_job_gpus=1)
    assert job_gpus(_job(), settings) == 1.0
    assert job_gpus(_job(0), settings) == 0.0  # a job may ask for the CPU on a GPU cluster
    assert job_gpus(_job(2), Settings()) == 2.0
    assert job_gpus(types.SimpleNamespace(method={}), Settings()) == 0.0  # queued before jobs had one


class _Host:
    """Stands for Ray's actor class: records the options each actor is made with."""

    def __init__(self) -> None:
        self.options_given: list[dict[str, Any]] = []
        self.run = self.started = self

    def options(self, **options: Any) -> _Host:
        self.options_given.append(options)
        return self

    def remote(self, *args: Any) -> _Host:
        return self


def _launcher(monkeypatch: pytest.MonkeyPatch, nodes: list[Any], **settings: Any) -> tuple[Any, _Host]:
    pytest.importorskip("ray", reason="the Ray launcher needs the ray extra")
    from llmos.cluster import jobs

    # Workers started here have not started their processes yet (their reservations may not be in
    # Ray's figures): Ray's ``wait`` finds none of their calls answered.
    monkeypatch.setattr(jobs.ray, "wait", lambda refs, timeout=None: ([], refs))
    launcher = jobs.RayJobLauncher(Settings(**settings), nodes=lambda: nodes, server_node=lambda: "head")
    host = _Host()
    launcher._host_class = host
    return launcher, host


def test_the_ray_launcher_reserves_the_gpus_a_job_asks_for(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmos.cluster.view import NodeView

    GPU_NODE, CPU_NODE = "a1" * 28, "c2" * 28  # Ray's node affinity takes only a node id's form
    nodes = [
        NodeView("head", "10.0.0.1", True, {"CPU": 4.0, "memory": 8.0 * GB}, {"CPU": 4.0, "memory": 8.0 * GB}),
        NodeView(
            GPU_NODE,
            "10.0.0.2",
            True,
            {"CPU": 2.0, "memory": 8.0 * GB, "GPU": 1.0},
            {"CPU": 2.0, "memory": 8.0 * GB, "GPU": 1.0},
        ),
        NodeView(CPU_NODE, "10.0.0.3", True, {"CPU": 8.0, "memory": 8.0 * GB}, {"CPU": 8.0, "memory": 8.0 * GB}),
    ]
    launcher, host = _launcher(monkeypatch, nodes, ray_job_gpus=1)
    on_gpu = launcher.place(_job())
    assert on_gpu == Placement(GPU_NODE, "10.0.0.2", GB, gpus=1.0)  # not "cpu", which has more CPUs
    assert launcher.place(_job(0)) == Placement(CPU_NODE, "10.0.0.3", GB)  # a job asking for none
    launcher.start("ftjob-1", 1, on_gpu)
    assert host.options_given[0]["num_gpus"] == 1.0
    # Its worker has not started: Ray may not count its GPU yet, the launcher does.
    busy = launcher.place(_job())
    assert isinstance(busy, NoRoom) and busy.later
    assert busy.reason.startswith("Waiting for a node with 1024 MiB of memory, 1 CPU and 1 GPU unreserved")
    launcher.start("ftjob-2", 1, launcher.place(_job(0)))
    assert "num_gpus" not in host.options_given[1]


def test_a_job_asking_for_a_gpu_on_a_cluster_without_one_stays_queued_saying_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llmos.cluster.view import NodeView

    nodes = [NodeView("head", "10.0.0.1", True, {"CPU": 4.0, "memory": 8.0 * GB}, {"CPU": 4.0, "memory": 8.0 * GB})]
    launcher, _ = _launcher(monkeypatch, nodes)
    never = launcher.place(_job(1))
    assert isinstance(never, NoRoom) and not never.later  # the jobs behind it may start meanwhile
    assert never.reason.startswith("No node of the cluster has 1024 MiB of memory, 1 CPU and 1 GPU in all")
    assert launcher.place(_job()) == Placement("head", "10.0.0.1", GB)  # ray_job_gpus 0: as before


def _create(platform: Platform, method: dict[str, Any]) -> Any:
    data = "\n".join(json.dumps(r) for r in ROWS).encode()
    record, _ = platform.files.create(
        tenant="default", purpose="fine-tune", filename="t.jsonl", chunks=[data], max_bytes=1 << 20
    )
    body = {"model": "tiny-chat", "training_file": record.id, "method": method}
    return platform.jobs.create(tenant="default", body=body)


def test_a_job_asks_for_gpus_in_its_method(loaded_platform: Platform) -> None:
    p = loaded_platform
    job = _create(p, {"type": "supervised", "supervised": {"gpus": 1}})
    assert job.method["resolved"]["gpus"] == 1.0 and job_gpus(job, p.settings) == 1.0
    assert _create(p, {"type": "supervised"}).method["resolved"]["gpus"] == 0.0  # the server's ray_job_gpus
    for bad in (-1, 65, "one", True):
        with pytest.raises(InvalidRequestError) as refused:
            _create(p, {"type": "supervised", "supervised": {"gpus": bad}})
        assert refused.value.param == "method.supervised.gpus"


def test_the_servers_ray_job_gpus_is_written_into_the_job_for_its_worker_elsewhere(
    settings: Settings, tiny_chat_dir: Path
) -> None:
    # The server's ray_job_gpus reaches a worker on another node only through the job: that worker
    # reads its own settings (no LLMOS_RAY_JOB_GPUS in its environment, its node's config.toml).
    with closing(Platform.open(settings.model_copy(update={"ray_job_gpus": 1.0}))) as server:
        server.registry.pull(f"file:{tiny_chat_dir}", name="tiny-chat")
        job = _create(server, {"type": "supervised"})
        own = _create(server, {"type": "supervised", "supervised": {"gpus": 0}})  # a job's own figure is kept
    assert job.method["resolved"]["gpus"] == 1.0 and job.public()["method"]["supervised"]["gpus"] == 1.0
    worker_settings = Settings(home=settings.home, ray_job_gpus=0)
    assert job_gpus(job, worker_settings) == 1.0 and job_gpus(own, Settings(ray_job_gpus=1)) == 0.0


def test_a_job_asking_for_more_gpus_than_any_live_node_has_is_refused_at_creation(
    loaded_platform: Platform, quiet_http: TestClient
) -> None:
    from llmos.cluster.view import NodeView

    p = loaded_platform
    data = "\n".join(json.dumps(r) for r in ROWS).encode()
    record, _ = p.files.create(
        tenant="default", purpose="fine-tune", filename="t.jsonl", chunks=[data], max_bytes=1 << 20
    )
    nodes = [
        NodeView("head", "10.0.0.1", True, {"CPU": 4.0, "memory": 64.0 * GB}, {"CPU": 4.0}),
        NodeView("one", "10.0.0.2", True, {"CPU": 4.0, "memory": 64.0 * GB, "GPU": 1.0}, {"CPU": 4.0, "GPU": 0.0}),
        NodeView("gone", "10.0.0.3", False, {"CPU": 4.0, "memory": 64.0 * GB, "GPU": 8.0}, None),  # dead
    ]
    p.jobs.cluster_nodes = lambda: nodes

    def create(gpus: float) -> Any:
        body = {
            "model": "tiny-chat",
            "training_file": record.id,
            "method": {"type": "supervised", "supervised": {"gpus": gpus}},
        }
        return quiet_http.post("/v1/fine_tuning/jobs", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"})

    refused = create(2)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "exceeds_cluster_gpus"
    assert error["param"] == "method.supervised.gpus"
    assert "asks for 2 GPUs" in error["message"] and "has more than 1:" in error["message"]
    assert not p.jobs.list("default", limit=100)[0]  # nothing queued
    # As many as the node with most has, busy or not, is queued (the job waits its turn), and so is a
    # job asking for none.
    assert create(1).status_code == 200 and create(0).status_code == 200


def test_a_worker_that_sees_no_gpu_trains_on_the_cpu_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    said: list[str] = []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_device(0, said.append) == "cpu" and said == []  # it asked for none
    assert training_device(1, said.append) == "cpu"
    assert said[0].startswith("This job asked for 1 GPU, but its worker sees no CUDA device (CUDA_VISIBLE_DEVICES='0'")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert training_device(0.5, said.append) == "cuda" and len(said) == 1
