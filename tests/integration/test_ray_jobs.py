"""Fine-tuning jobs in Ray cluster mode (issue 21 point 1) on a real two-node Ray cluster on this
machine: a job's worker is placed on the node other than the API server's, that node is killed
(its raylet, actors and the worker with them) after the job's first checkpoint, Ray reports the
worker lost, and the job resumes from its checkpoint on the head node and completes with every
epoch's checkpoint saved once. Both nodes share this machine's data directory, as nodes of a real
cluster share theirs (docs/scaling.md)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.integration.conftest import ADMIN_KEY, Server
from tests.integration.ray_nodes import RayCluster, cluster_view, job_server, two_node_cluster, wait_for
from tests.unit.test_training_quota import ROWS

pytest.importorskip("ray", reason='Ray cluster mode needs the ray extra (pip install "llmos[ray]")')

pytestmark = pytest.mark.integration

# 600 steps an epoch: on an idle machine the tiny model trains about 90 steps a second, and the
# job must still be running when the test kills its node after the first checkpoint.
TRAINING = "\n".join(json.dumps(r) for r in ROWS * 100).encode()
EPOCHS = 6
METHOD = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": EPOCHS, "batch_size": 2}}}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    with two_node_cluster() as cluster:
        yield cluster


@pytest.fixture
def server(ray_cluster: RayCluster, tmp_path: Path, tiny_chat_dir: Path) -> Iterator[Server]:
    with job_server(ray_cluster, tmp_path / "home", tiny_chat_dir) as server:
        yield server


def _cluster(server: Server) -> dict[str, Any]:
    return cluster_view(server.url, ADMIN_KEY)


def _job_node(server: Server, job_id: str) -> str | None:
    """The node the admin view shows the job's worker on (None: no worker now)."""
    jobs = {j["id"]: j for j in _cluster(server)["jobs"]["data"]}
    return jobs[job_id]["node_id"] if job_id in jobs else None


def _messages(client: openai.OpenAI, job_id: str) -> list[str]:
    return [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=500).data]


@pytest.mark.timeout(3000)  # the waits' generous limits, for a machine shared under load
def test_a_job_whose_node_dies_resumes_on_the_other_node_from_its_checkpoint(
    ray_cluster: RayCluster, server: Server
) -> None:
    """What must hold on a slow machine too: the job's worker first runs on the second node, after
    that node's death it runs on the head and resumes there from a checkpoint past step 0, and it
    finishes with each epoch's checkpoint saved once. How many attempts that takes is not fixed: a
    worker's start or its node's loss may cost one more on a busy machine (docs/scaling.md)."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    training = client.files.create(file=("train.jsonl", TRAINING), purpose="fine-tune").id
    job_id = client.fine_tuning.jobs.create(model="tiny-chat", training_file=training, method=METHOD).id  # type: ignore[arg-type]

    head = _cluster(server)["server_node_id"]  # Ray attaches the server to the head on its machine
    first = wait_for("the job's worker to be placed", lambda: _job_node(server, job_id), 300)
    assert first != head, "the job goes to the node that is not the API server's"
    wait_for("the first checkpoint", lambda: client.fine_tuning.jobs.checkpoints.list(job_id).data, 600)
    assert _job_node(server, job_id) == first, "still running on the second node when it dies"
    assert client.fine_tuning.jobs.retrieve(job_id).status == "running", "the job must outlast its first epoch"

    os.killpg(ray_cluster.nodes[1].pid, signal.SIGKILL)  # the second node: its raylet, actors, the worker
    wait_for("the job to run on the head", lambda: _job_node(server, job_id) == head, 600)

    job = wait_for(
        "the job to finish",
        lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in ("succeeded", "failed", "cancelled") and j,
        900,
    )
    assert job.status == "succeeded", job.error
    messages = _messages(client, job_id)
    assert any(m.startswith("Worker exited unexpectedly") and "on node" in m for m in messages), messages
    resumed = [int(m.split()[5]) for m in messages if m.startswith("Resumed from checkpoint at step ")]
    assert resumed and min(resumed) > 0, messages  # every later attempt went on from a checkpoint
    assert len(client.fine_tuning.jobs.checkpoints.list(job_id, limit=100).data) == EPOCHS  # no epoch twice
    assert job.fine_tuned_model and client.models.retrieve(job.fine_tuned_model).id == job.fine_tuned_model
