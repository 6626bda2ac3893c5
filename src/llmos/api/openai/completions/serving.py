"""Text completions: each prompt becomes one engine request; choices are numbered prompt-major."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

from llmos.api.openai.common import (
    CollectedChoice,
    GenerationService,
    build_sampling,
    check_token_ids,
    finish_reason,
    new_id,
    now,
)
from llmos.api.openai.completions.schemas import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionStreamChoice,
)
from llmos.api.openai.scoring import check_prompt_scoring, legacy_entries, vllm_prompt_logprobs
from llmos.api.openai.structured import requested_grammar
from llmos.engine.protocol import GenerationDelta, GenerationRequest, ModelInfo, PromptLogprob, TokenLogprob
from llmos.errors import InvalidRequestError


class CompletionService(GenerationService):
    async def prepare(self, req: CompletionRequest) -> list[tuple[str, GenerationRequest]]:
        req.model = await asyncio.to_thread(self.ctx.route_model, req.model, req.user)
        handle = await self.engine.resolve(req.model)
        info = handle.info
        if info.task not in ("chat", "completion"):
            raise InvalidRequestError(
                f"model {req.model} is a {info.task} model; it cannot complete text", param="model"
            )
        scoring = self._prompt_scoring(req, info)
        asked = requested_grammar(req)
        grammar = await self.engine.compile_grammar(handle, asked[0], param=asked[1]) if asked else None
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
            params = dataclasses.replace(params, prompt_logprobs=scoring)
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
                        grammar=grammar,
                    ),
                )
            )
        return out

    def _prompt_scoring(self, req: CompletionRequest, info: ModelInfo) -> int | None:
        """The alternatives each prompt token is scored with (None: the prompt is not scored),
        checked before any work is queued."""
        if req.max_tokens == 0 and not req.echo:
            raise InvalidRequestError(
                "max_tokens 0 only scores the echoed prompt: set echo to true", param="max_tokens"
            )
        echo_k = req.logprobs if req.echo else None
        if req.stream and req.prompt_logprobs is not None:
            raise InvalidRequestError("prompt_logprobs are not streamed: set stream to false", param="prompt_logprobs")
        check_prompt_scoring(
            req.prompt_logprobs, param="prompt_logprobs", info=info, model=req.model, settings=self.settings
        )
        check_prompt_scoring(echo_k, param="echo", info=info, model=req.model, settings=self.settings)
        asked = [k for k in (echo_k, req.prompt_logprobs) if k is not None]
        return max(asked) if asked else None

    async def complete(self, req: CompletionRequest, gens: list[tuple[str, GenerationRequest]]) -> Completion:
        results, usage = await self.collect(req.model, [gen for _, gen in gens])
        choices = [
            self._choice(req, p * gen.params.n + c, echo, gen, choice)
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

    @staticmethod
    def _choice(
        req: CompletionRequest, index: int, echo: str, gen: GenerationRequest, choice: CollectedChoice
    ) -> CompletionChoice:
        scored = choice.prompt_logprobs
        if req.echo and scored and not echo:  # a prompt of token ids echoes as their text
            echo = "".join(p.token for p in scored)
        legacy = None
        if gen.params.logprobs:
            prompt = scored if req.echo else ()
            legacy = _legacy_logprobs(choice.logprobs, len(echo), prompt=prompt, k=req.logprobs or 0)
        return CompletionChoice(
            index=index,
            text=echo + choice.text,
            finish_reason=choice.finish_reason,
            logprobs=legacy,
            prompt_logprobs=vllm_prompt_logprobs(scored, req.prompt_logprobs)
            if req.prompt_logprobs is not None
            else None,
        )

    def stream(self, req: CompletionRequest, echo: str, gen: GenerationRequest) -> AsyncIterator[str]:
        """One prompt's choices as server-sent events (the router refuses several prompts)."""

        scored = gen.params.prompt_logprobs is not None  # the echo opens each choice with its logprobs

        def choices_of(delta: GenerationDelta) -> list[CompletionStreamChoice]:
            out = []
            if scored and delta.prompt_logprobs:
                text = echo or "".join(p.token for p in delta.prompt_logprobs)
                prompt = _legacy_logprobs((), 0, prompt=delta.prompt_logprobs, k=req.logprobs or 0)
                out.append(CompletionStreamChoice(index=delta.index, text=text, logprobs=prompt))
            logprobs = (
                _legacy_logprobs(delta.logprobs, 0, k=req.logprobs or 0)
                if gen.params.logprobs and delta.logprobs
                else None
            )
            if delta.text or logprobs or delta.finish_reason:
                reason = finish_reason(delta.finish_reason)
                out.append(
                    CompletionStreamChoice(index=delta.index, text=delta.text, logprobs=logprobs, finish_reason=reason)
                )
            return out

        opening = [] if scored else [CompletionStreamChoice(index=i, text=echo) for i in range(gen.params.n) if echo]
        return self.stream_events(req, gen, CompletionChunk, opening, choices_of)


def _legacy_logprobs(
    tokens: Sequence[TokenLogprob], offset: int, *, prompt: Sequence[PromptLogprob] = (), k: int
) -> CompletionLogprobs:
    listed, logprobs, tops, offsets = legacy_entries(prompt, tokens, k, offset)
    return CompletionLogprobs(tokens=listed, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)
