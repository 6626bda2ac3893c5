"""A fine-tuning job that asks for a GPU, on a real two-node Ray cluster on this machine whose head
advertises one GPU (``ray start --num-gpus 1``; this machine need not have it) and whose second
node has none (issue 21, docs/scaling.md "GPUs for jobs"): the job's worker goes to the head,
though a job asking for no GPU goes to the other node; the admin view shows the GPU it reserves;
its worker sees the GPU Ray assigned (``CUDA_VISIBLE_DEVICES``) and trains on it where this machine
has a CUDA GPU, else on the CPU saying so, and the job succeeds. What it checks is placement and the worker's
environment, not training on a GPU (tests/gpu has what needs one)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from tests.integration.conftest import ADMIN_KEY, Server
from tests.integration.ray_nodes import RayCluster, cluster_view, job_server, two_node_cluster, wait_for
from tests.unit.test_training_quota import ROWS

pytest.importorskip("ray", reason='Ray cluster mode needs the ray extra (pip install "llmos[ray]")')

pytestmark = pytest.mark.integration

TRAINING = "\n".join(json.dumps(r) for r in ROWS * 50).encode()
"""Enough steps for the job to be seen running on its node."""


def _method(gpus: float) -> dict[str, Any]:
    return {"type": "supervised", "supervised": {"gpus": gpus, "hyperparameters": {"n_epochs": 1, "batch_size": 2}}}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    with two_node_cluster(head_gpus=1) as cluster:
        yield cluster


@pytest.fixture
def server(ray_cluster: RayCluster, tmp_path: Path, tiny_chat_dir: Path) -> Iterator[Server]:
    with job_server(ray_cluster, tmp_path / "home", tiny_chat_dir) as server:
        yield server


def _placed(server: Server, job_id: str) -> dict[str, Any] | None:
    """The job as the admin view shows it while its worker runs (None: no worker now)."""
    jobs = {j["id"]: j for j in cluster_view(server.url, ADMIN_KEY)["jobs"]["data"]}
    return jobs.get(job_id)


def _finished(client: openai.OpenAI, job_id: str) -> Any:
    job = client.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in ("succeeded", "failed", "cancelled") else None


@pytest.mark.timeout(1800)  # the waits' generous limits, for a machine shared under load
def test_a_job_asking_for_a_gpu_runs_on_the_node_that_has_one(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    training = client.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune").id
    head = cluster_view(server.url, ADMIN_KEY)["server_node_id"]

    on_gpu = client.fine_tuning.jobs.create(model="tiny-chat", training_file=training, method=_method(1)).id  # type: ignore[arg-type]
    placed = wait_for("the GPU job's worker to be placed", lambda: _placed(server, on_gpu), 300)
    assert placed["node_id"] == head, "the only node with a GPU, though jobs prefer another than the server's"
    assert placed["gpus"] == 1.0 and placed["memory_bytes"] > 0
    job = wait_for("the GPU job to finish", lambda: _finished(client, on_gpu), 900)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in client.fine_tuning.jobs.list_events(on_gpu, limit=500).data]
    # Ray gave the actor its GPU, and the worker inherited it: on a machine without one, torch finds
    # no CUDA device behind it and the job says so; on one with a CUDA GPU (the head is this machine)
    # it trains there, silently.
    no_cuda = [
        m
        for m in messages
        if m.startswith("This job asked for 1 GPU, but its worker sees no CUDA device (CUDA_VISIBLE_DEVICES='0'")
    ]
    assert bool(no_cuda) != torch.cuda.is_available(), messages

    on_cpu = client.fine_tuning.jobs.create(model="tiny-chat", training_file=training, method=_method(0)).id  # type: ignore[arg-type]
    placed = wait_for("the CPU job's worker to be placed", lambda: _placed(server, on_cpu), 300)
    assert placed["node_id"] != head and placed["gpus"] == 0.0
    job = wait_for("the CPU job to finish", lambda: _finished(client, on_cpu), 900)
    assert job.status == "succeeded", job.error
