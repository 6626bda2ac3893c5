"""The typed message that crosses from the API server to an engine replica.

A ``GenerationRequest`` holds two objects of this process: the resolved handle (with its
tokenizer) and a grammar compiled for it. They are taken out and replaced by plain content: the
registry id the model resolved to and the grammar's spec, which the replica resolves and compiles
again with its own caches. Every other field crosses as it is, so a field added to the request
reaches the replica without a change here. Deltas come back as the engine's own
``GenerationDelta``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmos.engine.protocol import GenerationRequest, GrammarSpec


@dataclass(frozen=True)
class ReplicaRequest:
    request: GenerationRequest
    """Without its ``handle`` and ``grammar``."""
    model_id: str
    """The registry id ``request.model`` resolved to on the API server: the replica serves exactly it."""
    grammar: GrammarSpec | None
    """Compiled already on the API server (so valid): the replica compiles it for its own tokenizer copy."""


def to_wire(request: GenerationRequest, model_id: str) -> ReplicaRequest:
    plain = dataclasses.replace(request, handle=None, grammar=None)
    return ReplicaRequest(plain, model_id, request.grammar.spec if request.grammar is not None else None)
