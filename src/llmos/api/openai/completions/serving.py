"""Text completions: each prompt becomes one engine request; choices are numbered prompt-major."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from llmos.api.context import RequestContext
from llmos.api.openai.common import (
    FINGERPRINT,
    Usage,
    build_sampling,
    check_token_ids,
    engine_deltas,
    finish_reason,
    new_id,
    now,
    usage_chunk,
)
from llmos.api.openai.completions.schemas import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
from llmos.api.sse import SSE_DONE, sse_event
from llmos.config import Settings
from llmos.engine.protocol import EngineClient, GenerationRequest, TokenLogprob
from llmos.errors import EngineError, InvalidRequestError


@dataclass
class _Choice:
    text: str = ""
    tokens: list[TokenLogprob] = field(default_factory=list)
    reason: str | None = None


class CompletionService:
    def __init__(self, engine: EngineClient, settings: Settings, ctx: RequestContext) -> None:
        self.engine = engine
        self.settings = settings
        self.ctx = ctx

    async def prepare(self, req: CompletionRequest) -> list[tuple[str, GenerationRequest]]:
        await asyncio.to_thread(self.ctx.check_model, req.model)
        info = await self.engine.model_info(req.model)
        if info.task not in ("chat", "completion"):
            raise InvalidRequestError(
                f"model {req.model} is a {info.task} model; it cannot complete text", param="model"
            )
        base_id = new_id("cmpl")
        out = []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, str):
                ids = await self.engine.encode_text(req.model, prompt)
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
                    ),
                )
            )
        return out

    async def complete(self, req: CompletionRequest, gens: list[tuple[str, GenerationRequest]]) -> Completion:
        results = await asyncio.gather(*(self._collect(g) for _, g in gens))
        choices: list[CompletionChoice] = []
        completion_tokens = 0
        for p, ((echo, gen), (per_choice, used)) in enumerate(zip(gens, results, strict=True)):
            completion_tokens += used
            for c, choice in enumerate(per_choice):
                choices.append(
                    CompletionChoice(
                        index=p * gen.params.n + c,
                        text=echo + choice.text,
                        finish_reason=choice.reason,
                        logprobs=_legacy_logprobs(choice.tokens, len(echo)) if gen.params.logprobs else None,
                    )
                )
        prompt_tokens = sum(len(g.prompt_token_ids) for _, g in gens)
        self.ctx.finish(req.model, prompt_tokens, completion_tokens)
        return Completion(
            id=gens[0][1].request_id.rsplit("-", 1)[0],
            created=now(),
            model=req.model,
            choices=choices,
            system_fingerprint=FINGERPRINT,
            usage=Usage(
                prompt_tokens=prompt_tokens,
                completion_tokens=completion_tokens,
                total_tokens=prompt_tokens + completion_tokens,
            ),
        )

    async def _collect(self, gen: GenerationRequest) -> tuple[list[_Choice], int]:
        choices = [_Choice() for _ in range(gen.params.n)]
        used = 0
        async for delta in engine_deltas(self.engine, gen):
            choices[delta.index].text += delta.text
            choices[delta.index].tokens.extend(delta.logprobs)
            used += len(delta.token_ids)
            if delta.finish_reason is not None:
                choices[delta.index].reason = finish_reason(delta.finish_reason)
        return choices, used

    async def stream(self, req: CompletionRequest, gens: list[tuple[str, GenerationRequest]]) -> AsyncIterator[str]:
        if len(gens) != 1:
            raise InvalidRequestError("streaming supports one prompt per request", param="prompt")
        echo, gen = gens[0]
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        base = {
            "id": gen.request_id,
            "object": "text_completion",
            "created": now(),
            "model": req.model,
            "system_fingerprint": FINGERPRINT,
        }

        def chunk(index: int, text: str, reason: str | None, lp: CompletionLogprobs | None = None) -> str:
            payload = {
                **base,
                "choices": [
                    {"index": index, "text": text, "logprobs": lp.model_dump() if lp else None, "finish_reason": reason}
                ],
            }
            if include_usage:
                payload["usage"] = None
            return sse_event(payload)

        if echo:
            for i in range(gen.params.n):
                yield chunk(i, echo, None)
        used = 0
        try:
            async for delta in engine_deltas(self.engine, gen):
                used += len(delta.token_ids)
                lp = _legacy_logprobs(list(delta.logprobs), 0) if gen.params.logprobs and delta.logprobs else None
                if delta.text or lp or delta.finish_reason:
                    yield chunk(delta.index, delta.text, finish_reason(delta.finish_reason), lp)
        except EngineError as exc:
            yield sse_event(exc.to_dict())
            return
        finally:  # also when the client goes away: it pays for what was computed
            self.ctx.finish(req.model, len(gen.prompt_token_ids), used)
        if include_usage:
            yield sse_event(usage_chunk(base, len(gen.prompt_token_ids), used))
        yield SSE_DONE


def _legacy_logprobs(tokens: list[TokenLogprob], offset: int) -> CompletionLogprobs:
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
