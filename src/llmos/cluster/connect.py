"""Joining (or, for ``auto``, starting) the Ray cluster the settings name, with token authentication on.

Ray's ports execute code for whoever reaches them (ShadowRay, CVE-2023-48022). So Ray's token
authentication (Ray 2.52+) is always on: every node and driver must present the token in
``ray_token_path``. With a loopback ``ray_bind_host`` (the default) Ray runs in its single-machine
mode, where all its ports listen on loopback; a non-loopback one (which the settings accept only
with ``ray_allow_remote_bind``) is a multi-node cluster, whose gRPC ports Ray opens on every
interface. The dashboard is off unless given a port.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.config import Settings, is_loopback
from llmos.errors import NotInstalledError, ServiceUnavailableError

log = logging.getLogger(__name__)

SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
"""Ray's switch between multi-node clusters (1, Linux's default) and one machine on loopback (0)."""


@dataclass(frozen=True)
class ClusterSession:
    address: str
    """The GCS address other nodes join (``ray start --address``)."""
    started_head: bool
    """This process started the head (``auto``), so it stops with it."""


def ray_module() -> Any:
    """Ray, or a clear error naming the extra that installs it."""
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise NotInstalledError('ray_address is set but Ray is not installed: pip install "llmos[ray]"') from exc
    return ray


def ensure_token(path: Path) -> None:
    """Create an owner-only token file of 256 random bits (as ``ray get-auth-token --generate``
    does) unless one exists."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))


def enable_token_auth(path: Path) -> None:
    """Token authentication on for this process and the Ray processes it starts (they inherit the
    environment). Ray reads its mode once into its config: re-read it as Ray's own
    ``_enable_token_auth`` does, in case Ray was imported before."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)
    from ray._raylet import Config  # type: ignore[attr-defined]

    Config.initialize("")


def single_machine_mode() -> None:
    """Ray's single-machine mode: every Ray server of this process and of the processes it starts
    listens on loopback. Otherwise Ray replaces a loopback node address with the machine's
    reachable one and its gRPC servers listen on every interface (Ray 2.60, checked by
    tests/integration/test_ray_cluster.py). Ray reads the switch once, at import: it is set in the
    environment for the processes Ray starts and on the constant already read."""
    os.environ[SINGLE_MACHINE_ENV] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def connect(settings: Settings) -> ClusterSession:
    ray = ray_module()
    path = settings.ray_token_path
    auto = settings.ray_address == "auto"
    if auto:
        ensure_token(path)
    elif not path.is_file():
        raise ServiceUnavailableError(
            f"the Ray auth token file {path} is missing: copy the cluster's token there or set ray_auth_token_file"
        )
    enable_token_auth(path)
    if is_loopback(settings.ray_bind_host):
        single_machine_mode()
    options: dict[str, Any] = {
        "_node_ip_address": settings.ray_bind_host,
        "configure_logging": False,
        "log_to_driver": False,
        "namespace": "llmos",
    }
    if auto:
        # "local": a new head of our own, never a cluster Ray would find on this machine (RAY_ADDRESS,
        # the last `ray start`), whose binds and token this server does not control.
        options["address"] = "local"
        dashboard = settings.ray_dashboard_port > 0
        options["include_dashboard"] = dashboard
        if dashboard:
            options |= {"dashboard_host": settings.ray_bind_host, "dashboard_port": settings.ray_dashboard_port}
    else:
        options["address"] = settings.ray_address
    context = _init_keeping_sigterm(ray, options)
    address = context.address_info.get("gcs_address") or str(settings.ray_address)
    log.info("joined the Ray cluster at %s (token authentication on, node %s)", address, settings.ray_bind_host)
    return ClusterSession(address=address, started_head=auto)


def _init_keeping_sigterm(ray: Any, kwargs: dict[str, Any]) -> Any:
    """``ray.init``, with the process's SIGTERM handler put back: Ray replaces it with an exit on the
    spot, which would cut the server's drain of in-flight requests short."""
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if on_main_thread else None
    try:
        return ray.init(**kwargs)
    finally:
        if previous is not None:  # None: a handler not set from Python, which Ray's cannot be told from
            signal.signal(signal.SIGTERM, previous)


def disconnect() -> None:
    ray_module().shutdown()
