"""An engine replica: a Ray actor holding the in-process engine for the models routed to it.

The actor's process is a small serving process of its own: it opens the registry from the
server's settings (the same database and artifact store), builds a ``LocalEngine`` and serves the
engine protocol to the API server. Generation streams each ``GenerationDelta`` as it comes (a Ray
streaming generator); ``abort`` reaches the engine's scheduler, which frees the request's row.
The platform's own errors (at capacity, a prompt that can never fit, a wrong task) come back as
values and are raised again on the API server with their status and code intact.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from typing import Any

from llmos.cluster.wire import ReplicaRequest
from llmos.config import Settings
from llmos.engine.local import LocalEngine
from llmos.engine.process import configure_process
from llmos.engine.protocol import GenerationDelta
from llmos.errors import LLMOSError
from llmos.platform import open_registry

CALLS = frozenset({"embed", "classify", "extract_entities", "score_pairs"})
"""The engine's one-shot calls a replica serves (besides generation)."""


class EngineReplica:
    """Made a Ray actor by ``ray.remote(EngineReplica)`` (``cluster.pool``), so importing this
    module needs no Ray."""

    def __init__(self, settings: Settings) -> None:
        configure_process(settings)
        self.engine = LocalEngine(open_registry(settings), settings)

    async def generate(self, request: ReplicaRequest) -> AsyncIterator[GenerationDelta | LLMOSError]:
        try:
            handle = await self.engine.resolve(request.model_id)
            grammar = None
            if request.grammar is not None:
                grammar = await self.engine.compile_grammar(handle, request.grammar, param="response_format")
            local = dataclasses.replace(request.request, handle=handle, grammar=grammar)
            async for delta in self.engine.generate(local):
                yield delta
        except LLMOSError as exc:
            yield exc

    async def call(self, method: str, model_id: str, *args: Any, **kwargs: Any) -> Any:
        """One of ``CALLS`` on ``model_id``; its result, or the platform error it raised."""
        if method not in CALLS:
            raise ValueError(f"not a replica call: {method}")
        try:
            handle = await self.engine.resolve(model_id)
            return await getattr(self.engine, method)(handle, *args, **kwargs)
        except LLMOSError as exc:
            return exc

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def load(self, model_id: str, pin: bool) -> None:
        """Make ``model_id``'s runner resident (a new replica loads its model before taking requests)."""
        await self.engine.load(await self.engine.resolve(model_id), pin=pin)

    async def unload(self, model_id: str) -> None:
        await self.engine.unload(model_id)

    async def stats(self) -> dict[str, Any]:
        return self.engine.stats()

    async def pid(self) -> int:
        return os.getpid()

    async def shutdown(self) -> None:
        await self.engine.shutdown()
