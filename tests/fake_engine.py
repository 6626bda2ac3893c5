"""A deterministic engine for API tests: it implements ``EngineClient`` without any model.

mypy checks this module (pyproject's ``[tool.mypy] files``), so when the protocol changes the
fake must change with it; ``_conforms`` makes the check explicit. Tests choose what it answers
(the deltas a generation streams, a health or capacity failure) and read what it was asked.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

import llguidance

from llmos.engine import (
    ClassificationResult,
    EmbeddingResult,
    EngineClient,
    Entity,
    EntityResult,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelHandle,
    ModelInfo,
    PairScores,
)
from llmos.engine.grammar import CompiledGrammar, grammar_source
from llmos.engine.protocol import GrammarSpec
from llmos.errors import InvalidRequestError, ModelNotFoundError

DEFAULT_MODELS = (
    ModelInfo(name="tiny-chat", task="chat", context_length=128, has_chat_template=True, vocab_size=100),
    ModelInfo(name="tiny-embed", task="embedding", context_length=128, has_chat_template=False, vocab_size=100),
)
EMBEDDING_SIZE = 4


@dataclass
class FakeEngine:
    """Answers from its fields; every call is recorded in ``calls`` (method names, in order)."""

    models: Sequence[ModelInfo] = DEFAULT_MODELS
    deltas: Sequence[GenerationDelta] = (
        GenerationDelta(index=0, text="Hello", token_ids=(5,)),
        GenerationDelta(index=0, text="", finish_reason=FinishReason.STOP),
    )
    """What ``generate`` streams for every request, as it is."""
    capacity_error: Exception | None = None
    """Raised by ``check_capacity`` (e.g. ServiceUnavailableError) when set."""
    health_error: Exception | None = None
    """Raised by ``check_health`` when set."""
    calls: list[str] = field(default_factory=list)
    requests: list[GenerationRequest] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    closed: bool = False

    def _info(self, model: str) -> ModelInfo:
        for info in self.models:
            if info.name == model:
                return info
        raise ModelNotFoundError(f"The model '{model}' does not exist.")

    async def resolve(self, model: str) -> ModelHandle:
        self.calls.append("resolve")
        return ModelHandle(name=model, info=self._info(model))

    async def encode_chat(
        self, model: ModelHandle, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        self.calls.append("encode_chat")
        return [1 + len(m.get("content", "")) % 50 for m in messages]

    async def compile_grammar(self, model: ModelHandle, spec: GrammarSpec, *, param: str) -> CompiledGrammar:
        """Checks the grammar as the engine would, without a tokenizer (nothing is constrained)."""
        self.calls.append("compile_grammar")
        error = llguidance.LLMatcher.validate_grammar(grammar_source(spec))
        if error:
            raise InvalidRequestError(f"invalid {param}: {error}", param=param)
        return CompiledGrammar(spec, None, 0)

    async def encode_text(self, model: ModelHandle, text: str) -> list[int]:
        self.calls.append("encode_text")
        return [1 + ord(c) % 50 for c in text] or [1]

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        self.calls.append("generate")
        self.requests.append(request)
        for delta in self.deltas:
            yield delta

    async def embed(self, model: ModelHandle, inputs: list[str] | list[list[int]]) -> EmbeddingResult:
        self.calls.append("embed")
        vectors = [[float(len(item) + i) for i in range(EMBEDDING_SIZE)] for item in inputs]
        return EmbeddingResult(vectors=vectors, prompt_tokens=sum(len(item) for item in inputs))

    async def classify(self, model: ModelHandle, inputs: list[str]) -> ClassificationResult:
        self.calls.append("classify")
        return ClassificationResult(
            labels=["positive", "negative"], scores=[[0.75, 0.25] for _ in inputs], prompt_tokens=len(inputs)
        )

    async def score_pairs(
        self, model: ModelHandle, pairs: list[tuple[str, str]], *, tenant: str, truncate: bool = False
    ) -> PairScores:
        """The share of a document's words that are in its query."""
        self.calls.append("score_pairs")
        scores = []
        for query, document in pairs:
            words = document.lower().split()
            scores.append(sum(w in query.lower().split() for w in words) / max(1, len(words)))
        return PairScores(scores=scores, prompt_tokens=len(pairs))

    async def extract_entities(self, model: ModelHandle, inputs: list[str]) -> EntityResult:
        self.calls.append("extract_entities")
        found = [
            [Entity(entity="word", text=text, start=0, end=len(text), score=1.0)] if text else [] for text in inputs
        ]
        return EntityResult(entities=found, prompt_tokens=len(inputs))

    async def abort(self, request_id: str) -> None:
        self.calls.append("abort")
        self.aborted.append(request_id)

    def check_capacity(self) -> None:
        # Not recorded in ``calls``: the API asks it first on every request, and tests read
        # ``calls`` to see what work was done after it.
        if self.capacity_error is not None:
            raise self.capacity_error

    async def check_health(self) -> None:
        self.calls.append("check_health")
        if self.health_error is not None:
            raise self.health_error

    def stats(self) -> dict[str, Any]:
        return {"pending_requests": 0, "models": {}}

    async def load(self, model: ModelHandle, *, pin: bool) -> None:
        self.calls.append("load+pin" if pin else "load")

    async def unload(self, model_id: str) -> None:
        self.calls.append("unload")

    async def shutdown(self) -> None:
        self.closed = True


def _conforms(engine: FakeEngine) -> EngineClient:
    return engine  # mypy fails here if FakeEngine no longer implements the protocol
