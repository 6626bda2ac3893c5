"""The one protocol the API talks to. Backends implement it; tests fake it.

Typed messages cross every boundary: the API builds a ``GenerationRequest`` and receives
``GenerationDelta`` values; no backend type leaks out.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from llmos.engine.grammar import CompiledGrammar

HEAD_POOLINGS = ("cls", "mean")
"""What a sequence classifier's head may read (``torch_backend/head_pooling.py``); here, where
request validation can see it without importing the backend (torch, transformers)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: int | None = None
    """Score the prompt: each prompt token's logprob and this many most likely alternatives
    (None: not asked). With ``max_tokens`` 0 the request only scores, generating nothing."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token, to ``max_tokens`` (load generators ask it)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class GrammarSpec:
    """What a constrained request's output must match: a JSON Schema (its canonical JSON text),
    a regular expression or a Lark grammar (``engine.grammar`` compiles it)."""

    kind: Literal["json_schema", "regex", "lark"]
    source: str
    parts: tuple[tuple[str, GrammarSpec], ...] = ()
    """Named grammars a Lark grammar refers to as ``@name`` (a tool call or a response format's
    answer)."""


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    model: str
    prompt_token_ids: Sequence[int]
    params: SamplingParams
    tenant: str = "default"
    """Requests are admitted round-robin across tenants, so a flood from one cannot starve another."""
    handle: ModelHandle | None = field(default=None, compare=False, repr=False)
    """``model`` as this request's ``EngineClient.resolve`` resolved it."""
    background: bool = False
    """Work nobody waits on (a batch's lines): it takes only rows interactive requests leave free
    and is parked when they need them (``engine.scheduler``)."""
    grammar: CompiledGrammar | None = field(default=None, compare=False, repr=False)
    """The grammar every choice's output follows, from ``EngineClient.compile_grammar``."""
    prediction_token_ids: Sequence[int] = field(default=(), compare=False, repr=False)
    """Tokens the answer is expected to repeat (OpenAI's Predicted Outputs): speculative decoding
    drafts from them as from the prompt; the output is the same with or without them."""

    @property
    def scoring(self) -> bool:
        """It scores its prompt and generates at most one token (a harness's log-likelihood, a
        rerank): prefill work no reader watches stream, so its prompt yields to generating ones."""
        return self.params.prompt_logprobs is not None and self.params.max_tokens <= 1


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(frozen=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class PromptLogprob:
    """A prompt token as the model scores it given the tokens before it (the first token of a
    prompt has nothing before it: its ``logprob`` and ``rank`` are None)."""

    token_id: int
    token: str
    logprob: float | None
    rank: int | None
    """1 for the most likely token of the vocabulary."""
    top: tuple[tuple[int, str, float], ...] = ()
    """The ``prompt_logprobs`` most likely tokens at this position: id, text, logprob."""


@dataclass(frozen=True)
class GenerationDelta:
    """New output for one choice of a request; ``finish_reason`` is set on its last delta."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None
    prompt_logprobs: tuple[PromptLogprob, ...] = ()
    """The scored prompt, on each choice's first delta when the request asked for it."""
    draft_tokens: int = 0
    """Tokens speculative decoding drafted for this choice and verified since its previous delta."""
    accepted_draft_tokens: int = 0
    """Draft tokens streamed as this choice's output since its previous delta (summed over a
    choice's deltas, the accepted ones; the rest of ``draft_tokens`` were rejected)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    task: str
    context_length: int
    has_chat_template: bool
    vocab_size: int = 0
    """Token ids a prompt may use are below this (0: unknown)."""
    scores_prompts: bool = False
    """Whether its backend returns prompt logprobs (``SamplingParams.prompt_logprobs``)."""
    speculates: bool = False
    """Whether a single stream of it drafts and verifies tokens (speculative decoding), which a chat
    request's ``prediction`` is drafted from."""


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int


@dataclass(frozen=True)
class ClassificationResult:
    labels: list[str]
    """The model's label set, in score order."""
    scores: list[list[float]]
    """One probability per label for every input."""
    prompt_tokens: int


@dataclass(frozen=True)
class PairScores:
    scores: list[float]
    """How relevant each (query, document) pair's document is to its query, in [0, 1], in order."""
    prompt_tokens: int


@dataclass(frozen=True)
class Entity:
    """A named entity found in an input: its type, its text and where it stands."""

    entity: str
    text: str
    start: int
    """Character offset of its first character in the input."""
    end: int
    """Character offset just past its last character: ``input[start:end] == text``."""
    score: float
    """The mean probability of the tags of its words."""


@dataclass(frozen=True)
class EntityResult:
    entities: list[list[Entity]]
    """The entities of every input, in order of position."""
    prompt_tokens: int


@dataclass(frozen=True)
class ModelHandle:
    """A model reference resolved once per request; the request's later calls take it."""

    name: str
    """The reference as the client wrote it (a name, alias, ``name:version`` or id)."""
    info: ModelInfo
    ref: Any = field(default=None, compare=False, repr=False)
    """The engine's own resolution (opaque to the API)."""


@runtime_checkable
class EngineClient(Protocol):
    """What the API may ask of an inference engine."""

    async def resolve(self, model: str) -> ModelHandle:
        """Resolve a model reference once per request (facts the API validates requests against
        in ``handle.info``); raises ModelNotFoundError."""
        ...

    async def encode_chat(
        self, model: ModelHandle, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Prompt token ids for a chat, through the model's chat template (``tools``: the
        request's function tools, which the template renders, or a fallback prompt)."""
        ...

    async def compile_grammar(self, model: ModelHandle, spec: GrammarSpec, *, param: str) -> CompiledGrammar:
        """``spec`` compiled for the model's tokenizer (cached); raises InvalidRequestError naming
        ``param`` when it is invalid or over the compile budget."""
        ...

    async def encode_text(self, model: ModelHandle, text: str) -> list[int]: ...

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationDelta, None]:
        """Stream deltas of every choice until each has a finish reason (``request.handle``
        resolved by ``resolve``; without one the engine resolves ``request.model`` itself)."""
        ...

    async def embed(self, model: ModelHandle, inputs: list[str] | list[list[int]]) -> EmbeddingResult: ...

    async def classify(self, model: ModelHandle, inputs: list[str]) -> ClassificationResult:
        """Label probabilities from a sequence-classification model."""
        ...

    async def extract_entities(self, model: ModelHandle, inputs: list[str]) -> EntityResult:
        """Named entities (BIO spans with character offsets) from a token-classification model."""
        ...

    async def score_pairs(
        self, model: ModelHandle, pairs: list[tuple[str, str]], *, tenant: str, truncate: bool = False
    ) -> PairScores:
        """Relevance of each (query, document) pair: a cross-encoder's (sequence-classification
        model) or a causal model's yes to ``engine.relevance``'s prompt; 400 naming ``model`` for
        a model that can do neither. A pair longer than the model takes is a 400 naming
        ``documents``, or with ``truncate`` (documents the platform cut itself, not a client's)
        scored on the document's beginning that fits."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for operators: what is resident, running and computed."""
        ...

    async def load(self, model: ModelHandle, *, pin: bool) -> None:
        """Make the runner that serves ``model`` resident now; with ``pin`` it is not evicted
        until ``unload``."""
        ...

    async def unload(self, model_id: str) -> None:
        """Unpin a model and forget it: its runner (unless requests are using it), adapters and
        tokenizer (also when it was deleted from the registry)."""
        ...

    async def abort(self, request_id: str) -> None:
        """Stop a request; no further tokens are computed for it."""
        ...

    def check_capacity(self) -> None:
        """Raise ServiceUnavailableError at once if no request can be admitted now (no I/O: the API
        asks before any other work, so a full server refuses in milliseconds)."""
        ...

    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""
        ...

    async def shutdown(self) -> None: ...
