"""Pulls as operations (``registry.operations``): ``ModelRegistry.pull`` run on a background
thread, its progress followed (stage, bytes, outcome) and cancellable at each progress report.

A pull that was running when the server stopped leaves nothing behind: its staging directory
and unreferenced blobs are removed as for any failed pull.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llmos.registry.operations import Operation, Operations
from llmos.registry.records import Lineage
from llmos.registry.service import ModelRegistry
from llmos.registry.sources import Progress


@dataclass
class PullOperation(Operation):
    model: str | None = None
    """``name@version`` once pulled."""

    def public(self) -> dict[str, Any]:
        return {"object": "model.pull", "ref": self.ref, "model": self.model, **super().public()}

    def succeed(self, **result: Any) -> None:
        self.model = result["model"]


class PullOperations(Operations[PullOperation]):
    """Starts, lists, follows and cancels pulls; at most ``max_running`` at once."""

    def __init__(self, registry: ModelRegistry, *, max_running: int = 2) -> None:
        super().__init__(kind="model pull", prefix="pull", max_running=max_running)
        self._registry = registry

    def start(
        self,
        ref: str,
        *,
        tenant: str,
        name: str | None = None,
        lineage: Lineage | None = None,
        description: str | None = None,
        tags: tuple[str, ...] | None = None,
    ) -> PullOperation:
        def pull(progress: Progress) -> dict[str, Any]:
            record = self._registry.pull(ref, name=name, progress=progress, lineage=lineage)
            if description is not None or tags is not None:
                record = self._registry.describe(record.id, description=description, tags=tags)
            return {"model": f"{record.name}@{record.version}"}

        return self.launch(PullOperation(id=self.new_id(), ref=ref, tenant=tenant), pull)
