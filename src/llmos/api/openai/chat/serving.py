"""Chat completions logic: messages -> prompt -> engine -> OpenAI objects (whole or streamed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from llmos.api.context import RequestContext
from llmos.api.openai.chat.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    TokenLogprobOut,
    TopLogprobOut,
)
from llmos.api.openai.common import (
    FINGERPRINT,
    Usage,
    build_sampling,
    engine_deltas,
    finish_reason,
    new_id,
    now,
    usage_chunk,
)
from llmos.api.sse import SSE_DONE, sse_event
from llmos.config import Settings
from llmos.engine.protocol import EngineClient, GenerationRequest, TokenLogprob
from llmos.errors import EngineError, InvalidRequestError


def logprob_out(lp: TokenLogprob) -> TokenLogprobOut:
    return TokenLogprobOut(
        token=lp.token,
        logprob=lp.logprob,
        bytes=lp.bytes,
        top_logprobs=[TopLogprobOut(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in lp.top_logprobs],
    )


class ChatService:
    def __init__(self, engine: EngineClient, settings: Settings, ctx: RequestContext) -> None:
        self.engine = engine
        self.settings = settings
        self.ctx = ctx

    async def prepare(self, req: ChatCompletionRequest) -> GenerationRequest:
        await asyncio.to_thread(self.ctx.check_model, req.model)
        info = await self.engine.model_info(req.model)
        if info.task != "chat" or not info.has_chat_template:
            raise InvalidRequestError(
                f"model {req.model} is a {info.task} model without a chat template; "
                "use /v1/completions or a chat model",
                param="model",
            )
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        prompt = await self.engine.encode_chat(req.model, messages)
        params = build_sampling(
            req,
            max_tokens=req.max_completion_tokens or req.max_tokens,
            prompt_tokens=len(prompt),
            info=info,
            settings=self.settings,
            logprobs=bool(req.logprobs),
            top_logprobs=req.top_logprobs or 0,
        )
        return GenerationRequest(
            request_id=new_id("chatcmpl"),
            model=req.model,
            prompt_token_ids=prompt,
            params=params,
            tenant=self.ctx.tenant,
        )

    async def complete(self, req: ChatCompletionRequest, gen: GenerationRequest) -> ChatCompletion:
        n = gen.params.n
        texts = [""] * n
        reasons: list[str | None] = [None] * n
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        completion_tokens = 0
        async for delta in engine_deltas(self.engine, gen):
            texts[delta.index] += delta.text
            logprobs[delta.index].extend(delta.logprobs)
            completion_tokens += len(delta.token_ids)
            if delta.finish_reason is not None:
                reasons[delta.index] = finish_reason(delta.finish_reason)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=texts[i]),
                finish_reason=reasons[i],
                logprobs=ChoiceLogprobs(content=[logprob_out(x) for x in logprobs[i]]) if gen.params.logprobs else None,
            )
            for i in range(n)
        ]
        prompt_tokens = len(gen.prompt_token_ids)
        self.ctx.finish(req.model, prompt_tokens, completion_tokens)
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return ChatCompletion(
            id=gen.request_id,
            created=now(),
            model=req.model,
            choices=choices,
            system_fingerprint=FINGERPRINT,
            usage=usage,
        )

    async def stream(self, req: ChatCompletionRequest, gen: GenerationRequest) -> AsyncIterator[str]:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        base: dict[str, Any] = {
            "id": gen.request_id,
            "object": "chat.completion.chunk",
            "created": now(),
            "model": req.model,
            "system_fingerprint": FINGERPRINT,
        }
        if include_usage:
            base["usage"] = None

        def chunk(index: int, delta: dict[str, Any], reason: str | None = None, logprobs: Any = None) -> str:
            return sse_event(
                {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}
            )

        for i in range(gen.params.n):
            yield chunk(i, {"role": "assistant", "content": "", "refusal": None})
        completion_tokens = 0
        try:
            async for delta in engine_deltas(self.engine, gen):
                completion_tokens += len(delta.token_ids)
                lp = (
                    {"content": [logprob_out(x).model_dump() for x in delta.logprobs], "refusal": None}
                    if gen.params.logprobs and delta.logprobs
                    else None
                )
                if delta.text or lp:
                    yield chunk(delta.index, {"content": delta.text}, None, lp)
                if delta.finish_reason is not None:
                    yield chunk(delta.index, {}, finish_reason(delta.finish_reason))
        except EngineError as exc:
            yield sse_event(exc.to_dict())
            return
        finally:  # also when the client goes away: it pays for what was computed
            self.ctx.finish(req.model, len(gen.prompt_token_ids), completion_tokens)
        if include_usage:
            yield sse_event(usage_chunk(base, len(gen.prompt_token_ids), completion_tokens))
        yield SSE_DONE
