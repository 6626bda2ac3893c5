"""Request pieces shared by chat and completions: sampling fields, their validation, usage."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from llmos.config import Settings
from llmos.engine.protocol import (
    EngineClient,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
)
from llmos.errors import ContextLengthExceededError, EngineError, InvalidRequestError

FINGERPRINT = "fp_llmos"


class StrictModel(BaseModel):
    """Request bodies: wrong JSON types are refused (no "0.5" for 0.5); unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(StrictModel):
    include_usage: bool = False


class SamplingFields(StrictModel):
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


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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
    )


def finish_reason(reason: FinishReason | None) -> str | None:
    """The OpenAI spelling; an aborted choice never reaches a client that is still listening."""
    if reason is None:
        return None
    return "length" if reason == FinishReason.LENGTH else "stop"


async def engine_deltas(engine: EngineClient, gen: GenerationRequest) -> AsyncIterator[GenerationDelta]:
    """The engine's deltas for ``gen``; a failed generation raises EngineError. Closing this
    iterator early (a client gone) closes the engine stream, which aborts the request."""
    generator = engine.generate(gen)
    try:
        async for delta in generator:
            if delta.finish_reason == FinishReason.ERROR:
                raise EngineError(delta.error or "generation failed")
            yield delta
    finally:
        await generator.aclose()


def usage_chunk(base: dict[str, Any], prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The last streamed chunk when ``stream_options.include_usage`` is set: no choices, only usage."""
    usage = Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )
    return {**base, "choices": [], "usage": usage.model_dump()}
