"""What chat and completions share: sampling fields and their validation, usage metering, and
the one path from engine deltas to a response (whole, or streamed as server-sent events)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Literal, TypeVar

import anyio
from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.responses import Response

from llmos.api.context import RequestContext
from llmos.api.sse import CLIENT_CLOSED_REQUEST, SSE_DONE, ClientDisconnected, sse_event, until_disconnect
from llmos.config import Settings
from llmos.engine.protocol import (
    EngineClient,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
    PromptLogprob,
    SamplingParams,
    TokenLogprob,
)
from llmos.errors import ContextLengthExceededError, EngineError, InvalidRequestError
from llmos.monitoring.http import count_error
from llmos.monitoring.requests import GenerationMetrics

FINGERPRINT = "fp_llmos"


class StrictModel(BaseModel):
    """Request bodies: wrong JSON types are refused (no "0.5" for 0.5); unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class OpenAIRequest(StrictModel):
    """OpenAI request bodies: every field is honoured or refused (400 naming it), none dropped.
    A null field the server does not know asks for nothing and is accepted: clients echo back
    assistant messages with ``refusal: null`` or ``audio: null``."""

    model_config = ConfigDict(strict=True, extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_unknown_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = {f.alias or name for name, f in cls.model_fields.items()} | set(cls.model_fields)
            return {k: v for k, v in data.items() if v is not None or k in known}
        return data


class StreamOptions(OpenAIRequest):
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """vLLM's extra: every chunk carries the usage so far."""


class SamplingFields(OpenAIRequest):
    model: Annotated[str, Field(min_length=1, max_length=512)]
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    """vLLM's extra: generate to ``max_tokens`` past the end-of-sequence token."""


class CompletionTokensDetails(BaseModel):
    """OpenAI's breakdown of the completion tokens: a speculative decoder's drafts (its own
    predictions, the counterpart of OpenAI's Predicted Outputs) accepted into the output and
    rejected; rejected drafts are not counted in ``completion_tokens`` (the server chose to draft
    them). No reasoning or audio tokens are ever generated here."""

    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    reasoning_tokens: int = 0
    audio_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def check_token_ids(ids: list[int], info: ModelInfo, *, param: str) -> None:
    if info.vocab_size and any(t >= info.vocab_size for t in ids):
        raise InvalidRequestError(
            f"token ids must be below {info.vocab_size}, this model's vocabulary size", param=param
        )


def stop_sequences(stop: str | list[str] | None, settings: Settings) -> tuple[str, ...]:
    items = [stop] if isinstance(stop, str) else list(stop or [])
    if len(items) > settings.max_stop_sequences:
        raise InvalidRequestError(f"at most {settings.max_stop_sequences} stop sequences are allowed", param="stop")
    if any(not s or len(s) > 256 for s in items):
        raise InvalidRequestError("stop sequences must be 1 to 256 characters", param="stop")
    return tuple(items)


def build_sampling(
    req: SamplingFields,
    *,
    max_tokens: int | None,
    prompt_tokens: int,
    info: ModelInfo,
    settings: Settings,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    """Validate everything that needs the model or settings, before any work is queued."""
    n = req.n or 1
    if n > settings.max_n:
        raise InvalidRequestError(f"n must be at most {settings.max_n}", param="n")
    if top_logprobs > settings.max_top_logprobs:
        raise InvalidRequestError(f"top_logprobs must be at most {settings.max_top_logprobs}", param="top_logprobs")
    room = info.context_length - prompt_tokens
    if room <= 0:
        raise ContextLengthExceededError(
            f"This model's maximum context length is {info.context_length} tokens. However, your prompt is "
            f"{prompt_tokens} tokens long.",
            param="messages",
        )
    if max_tokens is not None:
        if max_tokens > settings.max_tokens_cap:
            raise InvalidRequestError(f"max_tokens must be at most {settings.max_tokens_cap}", param="max_tokens")
        if max_tokens > room:
            raise ContextLengthExceededError(
                f"This model's maximum context length is {info.context_length} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or max_tokens.",
                param="max_tokens",
            )
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else min(room, settings.max_tokens_cap),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        n=n,
        stop=stop_sequences(req.stop, settings),
        seed=req.seed,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        ignore_eos=req.ignore_eos,
    )


FinishReasonOut = Literal["stop", "length", "tool_calls"]


def finish_reason(reason: FinishReason | None) -> FinishReasonOut | None:
    """The OpenAI spelling; an aborted choice never reaches a client that is still listening."""
    if reason is None:
        return None
    return "length" if reason == FinishReason.LENGTH else "stop"


@dataclass
class UsageMeter:
    """The tokens one HTTP request has used so far. It is charged to the tenant exactly once,
    however the request ends: finished, failed, or abandoned by its client mid-generation."""

    ctx: RequestContext
    model: str
    prompt_tokens: int
    completion_tokens: int = 0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=self.prompt_tokens + self.completion_tokens,
            completion_tokens_details=CompletionTokensDetails(
                accepted_prediction_tokens=self.accepted_draft_tokens,
                rejected_prediction_tokens=self.draft_tokens - self.accepted_draft_tokens,
            ),
        )

    def count(self, delta: GenerationDelta) -> None:
        """Add what ``delta`` generated (its tokens, and the drafts verified for them)."""
        self.completion_tokens += len(delta.token_ids)
        self.draft_tokens += delta.draft_tokens
        self.accepted_draft_tokens += delta.accepted_draft_tokens

    def charge(self) -> None:
        self.ctx.finish(self.model, self.prompt_tokens, self.completion_tokens)


class Choice(BaseModel):
    """What every choice carries, whole or streamed: its index and, on its last, why it ended."""

    index: int
    finish_reason: FinishReasonOut | None = None


ChoiceT = TypeVar("ChoiceT", bound=Choice)


class ResponseObject(BaseModel, Generic[ChoiceT]):
    """The fields chat and text completions share, whole or streamed, as the ``openai`` package's
    ``ChatCompletion``, ``ChatCompletionChunk`` and ``Completion`` define them; each adds its
    ``object``, its choice type and its usage."""

    id: str
    created: int
    model: str
    choices: list[ChoiceT]
    system_fingerprint: str | None = FINGERPRINT


class StreamChunk(ResponseObject[ChoiceT], Generic[ChoiceT]):
    usage: Usage | None = None
    """Only sent when the request asked for ``stream_options.include_usage``: null on every chunk
    but the last, which has no choices."""


@dataclass
class CollectedChoice:
    """One choice of a whole (non-streamed) response, gathered from its deltas."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReasonOut | None = None
    prompt_logprobs: tuple[PromptLogprob, ...] = ()
    """The scored prompt, when the request asked for it."""


class GenerationService:
    """What the chat and completions services share: the engine, the settings, the request's
    context, and the one path from engine deltas to a response, whole or streamed. Either way
    the request is charged for what it generated, however it ends."""

    def __init__(self, engine: EngineClient, settings: Settings, ctx: RequestContext) -> None:
        self.engine = engine
        self.settings = settings
        self.ctx = ctx

    async def collect(self, model: str, gens: Sequence[GenerationRequest]) -> tuple[list[list[CollectedChoice]], Usage]:
        """Every choice of every request in ``gens`` (generated concurrently, in order) and their
        usage, charged when this ends: also when it is cancelled because the client went away."""
        meter = UsageMeter(self.ctx, model, sum(len(gen.prompt_token_ids) for gen in gens))
        try:
            results = await asyncio.gather(
                *(_collect_one(self.engine, gen, meter, observe=self.settings.metrics_enabled) for gen in gens)
            )
        finally:
            meter.charge()
        return list(results), meter.usage()

    def stream_events(
        self,
        req: SamplingFields,
        gen: GenerationRequest,
        chunk_type: type[StreamChunk[ChoiceT]],
        opening: Sequence[ChoiceT],
        choices_of: Callable[[GenerationDelta], Sequence[ChoiceT]],
    ) -> AsyncGenerator[str, None]:
        """``gen`` as server-sent events of ``chunk_type``, one choice each: the ``opening``
        choices, then those ``choices_of`` makes of each delta, the usage chunk when asked for,
        and ``[DONE]``; a failed generation ends with an error event instead."""
        template = chunk_type(id=gen.request_id, created=now(), model=req.model, choices=[])
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        continuous = bool(req.stream_options and req.stream_options.continuous_usage_stats)
        omit = None if include_usage or continuous else {"usage"}
        meter = UsageMeter(self.ctx, req.model, len(gen.prompt_token_ids))

        def event(choices: list[ChoiceT], usage: Usage | None = None) -> str:
            chunk = template.model_copy(update={"choices": choices, "usage": usage})
            return sse_event(chunk, exclude=omit)

        async def events() -> AsyncGenerator[str, None]:
            for choice in opening:
                yield event([choice])
            try:
                async for delta in engine_deltas(self.engine, gen, meter, observe=self.settings.metrics_enabled):
                    for choice in choices_of(delta):
                        yield event([choice], meter.usage() if continuous else None)
            except EngineError as exc:
                if self.settings.metrics_enabled:  # its response began 200: the HTTP middleware cannot see it
                    count_error(exc.code)
                yield sse_event(exc.to_dict())
                return
            finally:  # also when the client goes away: it pays for what was computed
                meter.charge()
            if include_usage:
                yield event([], meter.usage())
            yield SSE_DONE

        return events()


async def engine_deltas(
    engine: EngineClient, gen: GenerationRequest, meter: UsageMeter, *, observe: bool
) -> AsyncIterator[GenerationDelta]:
    """The engine's deltas for ``gen``, their tokens counted on ``meter`` (and, if ``observe``,
    in the request metrics); a failed generation raises EngineError. Closing this iterator early
    (a client gone) closes the engine stream, which aborts the request at the engine's next step."""
    generator = engine.generate(gen)
    observed = GenerationMetrics(gen) if observe else None
    try:
        async for delta in generator:
            if observed is not None:
                observed.observe(delta)
            if delta.finish_reason == FinishReason.ERROR:
                raise EngineError(delta.error or "generation failed")
            meter.count(delta)
            yield delta
    finally:
        if observed is not None:
            observed.close()
        with anyio.CancelScope(shield=True):  # a cancelled caller must still abort the engine request
            await generator.aclose()


async def _collect_one(
    engine: EngineClient, gen: GenerationRequest, meter: UsageMeter, *, observe: bool
) -> list[CollectedChoice]:
    choices = [CollectedChoice() for _ in range(gen.params.n)]
    async for delta in engine_deltas(engine, gen, meter, observe=observe):
        choice = choices[delta.index]
        choice.text += delta.text
        choice.logprobs.extend(delta.logprobs)
        choice.prompt_logprobs = delta.prompt_logprobs or choice.prompt_logprobs
        if delta.finish_reason is not None:
            choice.finish_reason = finish_reason(delta.finish_reason)
    return choices


async def respond_while_connected(request: Request, work: Awaitable[BaseModel]) -> Response:
    """The JSON of ``work``'s result. Starlette does not cancel a plain handler whose client has
    gone, so the disconnect is watched here: ``work`` is cancelled (aborting its generation and
    charging what it used) and nobody is left to read the 499 answered instead."""
    try:
        result = await until_disconnect(request.receive, work)
    except ClientDisconnected:
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    return Response(result.model_dump_json(), media_type="application/json")
