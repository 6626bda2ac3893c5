"""Chat completions logic: messages -> prompt -> engine -> OpenAI objects (whole or streamed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from llmos.api.openai.chat.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    TokenLogprobOut,
    TopLogprobOut,
)
from llmos.api.openai.common import GenerationService, build_sampling, finish_reason, new_id, now
from llmos.engine.protocol import GenerationDelta, GenerationRequest, TokenLogprob
from llmos.errors import InvalidRequestError


def logprob_out(lp: TokenLogprob) -> TokenLogprobOut:
    return TokenLogprobOut(
        token=lp.token,
        logprob=lp.logprob,
        bytes=lp.bytes,
        top_logprobs=[TopLogprobOut(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in lp.top_logprobs],
    )


class ChatService(GenerationService):
    async def prepare(self, req: ChatCompletionRequest) -> GenerationRequest:
        await asyncio.to_thread(self.ctx.check_model, req.model)
        handle = await self.engine.resolve(req.model)
        info = handle.info
        if info.task != "chat" or not info.has_chat_template:
            raise InvalidRequestError(
                f"model {req.model} is a {info.task} model without a chat template; "
                "use /v1/completions or a chat model",
                param="model",
            )
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        prompt = await self.engine.encode_chat(handle, messages)
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
            handle=handle,
        )

    async def complete(self, req: ChatCompletionRequest, gen: GenerationRequest) -> ChatCompletion:
        (collected,), usage = await self.collect(req.model, [gen])
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content=choice.text),
                finish_reason=choice.finish_reason,
                logprobs=_logprobs(choice.logprobs) if gen.params.logprobs else None,
            )
            for i, choice in enumerate(collected)
        ]
        return ChatCompletion(
            id=gen.request_id,
            created=now(),
            model=req.model,
            choices=choices,
            usage=usage,
        )

    def stream(self, req: ChatCompletionRequest, gen: GenerationRequest) -> AsyncIterator[str]:
        def choices_of(delta: GenerationDelta) -> list[ChunkChoice]:
            out = []
            logprobs = _logprobs(delta.logprobs) if gen.params.logprobs and delta.logprobs else None
            if delta.text or logprobs:
                out.append(ChunkChoice(index=delta.index, delta=ChoiceDelta(content=delta.text), logprobs=logprobs))
            if delta.finish_reason is not None:
                out.append(
                    ChunkChoice(
                        index=delta.index, delta=ChoiceDelta(), finish_reason=finish_reason(delta.finish_reason)
                    )
                )
            return out

        opening = [
            ChunkChoice(index=i, delta=ChoiceDelta(role="assistant", content="", refusal=None))
            for i in range(gen.params.n)
        ]
        return self.stream_events(req, gen, ChatCompletionChunk, opening, choices_of)


def _logprobs(tokens: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[logprob_out(x) for x in tokens])
