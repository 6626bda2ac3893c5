"""Text completions: each prompt becomes one engine request; choices are numbered prompt-major."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from llmos.api.openai.common import GenerationService, build_sampling, check_token_ids, finish_reason, new_id, now
from llmos.api.openai.completions.schemas import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
)
from llmos.engine.protocol import GenerationDelta, GenerationRequest, TokenLogprob
from llmos.errors import InvalidRequestError


class CompletionService(GenerationService):
    async def prepare(self, req: CompletionRequest) -> list[tuple[str, GenerationRequest]]:
        await asyncio.to_thread(self.ctx.check_model, req.model)
        handle = await self.engine.resolve(req.model)
        info = handle.info
        if info.task not in ("chat", "completion"):
            raise InvalidRequestError(
                f"model {req.model} is a {info.task} model; it cannot complete text", param="model"
            )
        base_id = new_id("cmpl")
        out = []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, str):
                ids = await self.engine.encode_text(handle, prompt)
                echo_text = prompt
            else:
                ids, echo_text = prompt, ""
                check_token_ids(ids, info, param="prompt")
            params = build_sampling(
                req,
                max_tokens=req.max_tokens,
                prompt_tokens=len(ids),
                info=info,
                settings=self.settings,
                logprobs=req.logprobs is not None,
                top_logprobs=req.logprobs or 0,
            )
            out.append(
                (
                    echo_text if req.echo else "",
                    GenerationRequest(
                        request_id=f"{base_id}-{i}",
                        model=req.model,
                        prompt_token_ids=ids,
                        params=params,
                        tenant=self.ctx.tenant,
                        handle=handle,
                    ),
                )
            )
        return out

    async def complete(self, req: CompletionRequest, gens: list[tuple[str, GenerationRequest]]) -> Completion:
        results, usage = await self.collect(req.model, [gen for _, gen in gens])
        choices = [
            CompletionChoice(
                index=p * gen.params.n + c,
                text=echo + choice.text,
                finish_reason=choice.finish_reason,
                logprobs=_legacy_logprobs(choice.logprobs, len(echo)) if gen.params.logprobs else None,
            )
            for p, ((echo, gen), collected) in enumerate(zip(gens, results, strict=True))
            for c, choice in enumerate(collected)
        ]
        return Completion(
            id=gens[0][1].request_id.rsplit("-", 1)[0],
            created=now(),
            model=req.model,
            choices=choices,
            usage=usage,
        )

    def stream(self, req: CompletionRequest, echo: str, gen: GenerationRequest) -> AsyncIterator[str]:
        """One prompt's choices as server-sent events (the router refuses several prompts)."""

        def choices_of(delta: GenerationDelta) -> list[CompletionChoice]:
            logprobs = _legacy_logprobs(delta.logprobs, 0) if gen.params.logprobs and delta.logprobs else None
            if not (delta.text or logprobs or delta.finish_reason):
                return []
            reason = finish_reason(delta.finish_reason)
            return [CompletionChoice(index=delta.index, text=delta.text, logprobs=logprobs, finish_reason=reason)]

        opening = [CompletionChoice(index=i, text=echo, finish_reason=None) for i in range(gen.params.n) if echo]
        return self.stream_events(req, gen, CompletionChunk, opening, choices_of)


def _legacy_logprobs(tokens: Sequence[TokenLogprob], offset: int) -> CompletionLogprobs:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[{x.token: x.logprob for x in t.top_logprobs} for t in tokens],
        text_offset=offsets,
    )
