"""Single-process mode's cluster view: this machine is the one node and each model resident in the
in-process engine is its replica, so ``/v1/admin/cluster`` and the console's Cluster page answer
the same questions with or without Ray (no Ray here)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from llmos.cluster.view import SINGLE_PROCESS_MODE, ClusterView, EngineCounts, NodeView, ReplicaView
from llmos.kernel.devices import detect_cpu, detect_gpus

LOCAL_NODE = "local"
"""The node id of this machine in single-process mode."""


def this_machine() -> NodeView:
    """This machine's cores, memory and GPUs, and what is free of them now: the memory Linux can
    give without swapping (``MemAvailable``), the cores the 1-minute load average leaves idle, and
    each GPU's free memory and utilisation (``kernel.devices``)."""
    cores = detect_cpu().cores
    total, available = _memory()
    gpus = detect_gpus()
    resources = {"CPU": float(cores), "GPU": float(len(gpus)), "memory": float(total)}
    free = {"CPU": max(0.0, round(cores - os.getloadavg()[0], 2)), "memory": float(available)}
    return NodeView(LOCAL_NODE, socket.gethostname(), True, resources, free, [gpu.public() for gpu in gpus])


def _memory() -> tuple[int, int]:
    """Total and available bytes (from /proc/meminfo; elsewhere the free pages the C library reports)."""
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return _kib(fields["MemTotal"]), _kib(fields["MemAvailable"])
    except (OSError, KeyError, ValueError):
        page = os.sysconf("SC_PAGE_SIZE")
        return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")


def _kib(value: str) -> int:
    return int(value.split()[0]) * 1024


def single_process_view(stats: dict[str, Any]) -> ClusterView:
    """The view of ``stats`` (the in-process engine's ``stats()``): one replica per resident runner."""
    replicas = []
    for key, runner in stats.get("models", {}).items():
        queued = int(runner.get("requests_running", 0)) + int(runner.get("requests_waiting", 0))
        replicas.append(
            ReplicaView(
                replica_id=key,
                model=str(runner.get("name", key)),
                node_id=LOCAL_NODE,
                queue_depth=None,
                adapters=[str(a) for a in runner.get("adapters", [])],
                state="ready",
                pid=os.getpid(),
                counts=EngineCounts.of({"pending_requests": queued, "models": {key: runner}}),
            )
        )
    return ClusterView(None, [this_machine()], replicas, server_node=LOCAL_NODE, mode=SINGLE_PROCESS_MODE)
