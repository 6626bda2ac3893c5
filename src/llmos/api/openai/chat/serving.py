"""Chat completions logic: messages -> prompt -> engine -> OpenAI objects (whole or streamed)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

from llmos.api.openai.chat.prediction import prediction_tokens
from llmos.api.openai.chat.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChoiceDelta,
    ChoiceLogprobs,
    ChunkChoice,
    FunctionCallOut,
    FunctionDelta,
    TokenLogprobOut,
    ToolCallDelta,
    ToolCallOut,
    TopLogprobOut,
)
from llmos.api.openai.chat.tools import (
    HeldCalls,
    ToolCall,
    check_tool_messages,
    check_tools,
    parse_tool_calls,
    tools_grammar,
    tools_in_play,
)
from llmos.api.openai.common import (
    CollectedChoice,
    GenerationService,
    UsageMeter,
    build_sampling,
    finish_reason,
    new_id,
    now,
)
from llmos.api.openai.scoring import check_prompt_scoring, vllm_prompt_logprobs
from llmos.api.openai.structured import requested_grammar
from llmos.api.sse import SSE_DONE
from llmos.engine.protocol import GenerationDelta, GenerationRequest, TokenLogprob
from llmos.errors import InvalidRequestError
from llmos.registry.metadata import check_metadata


def logprob_out(lp: TokenLogprob) -> TokenLogprobOut:
    return TokenLogprobOut(
        token=lp.token,
        logprob=lp.logprob,
        bytes=lp.bytes,
        top_logprobs=[TopLogprobOut(token=t.token, logprob=t.logprob, bytes=t.bytes) for t in lp.top_logprobs],
    )


class ChatService(GenerationService):
    output_check: Callable[[list[str]], Awaitable[None]] | None = None
    """Called with the answers before they are stored or returned; it raises to refuse them
    (a tenant's moderation policy, moderations/serving.py)."""

    async def prepare(self, req: ChatCompletionRequest) -> GenerationRequest:
        req.model = await asyncio.to_thread(self.ctx.route_model, req.model, req.user)
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
        check_metadata(req.metadata)
        check_tools(req.tools, req.tool_choice)
        check_tool_messages(req.messages)
        tools = tools_in_play(req.tools, req.tool_choice)
        asked = requested_grammar(req)
        choice = req.tool_choice or "auto"
        if asked is not None and tools and choice != "auto":
            raise InvalidRequestError("a forced tool call cannot also follow response_format", param=asked[1])
        if asked is not None and tools:  # compiled alone first, so that its errors name its own field
            await self.engine.compile_grammar(handle, asked[0], param=asked[1])
        answer = asked[0] if asked is not None else None
        with_tools = tools_grammar(tools, choice, req.parallel_tool_calls is not False, answer)
        spec, param = (with_tools, "tools") if with_tools is not None else asked or (None, "")
        grammar = await self.engine.compile_grammar(handle, spec, param=param) if spec is not None else None
        prediction = await prediction_tokens(req, self.engine, handle, self.settings, param if spec else "")
        messages = [m.rendered() for m in req.messages]
        prompt = await self.engine.encode_chat(
            handle, messages, [t.model_dump(exclude_none=True) for t in tools] or None
        )
        params = build_sampling(
            req,
            max_tokens=req.max_completion_tokens or req.max_tokens,
            prompt_tokens=len(prompt),
            info=info,
            settings=self.settings,
            logprobs=bool(req.logprobs),
            top_logprobs=req.top_logprobs or 0,
        )
        if req.prompt_logprobs is not None:
            if req.stream:
                raise InvalidRequestError(
                    "prompt logprobs are not streamed: set stream to false", param="prompt_logprobs"
                )
            check_prompt_scoring(
                req.prompt_logprobs, param="prompt_logprobs", info=info, model=req.model, settings=self.settings
            )
            params = dataclasses.replace(params, prompt_logprobs=req.prompt_logprobs)
        return GenerationRequest(
            request_id=new_id("chatcmpl"),
            model=req.model,
            prompt_token_ids=prompt,
            params=params,
            tenant=self.ctx.tenant,
            handle=handle,
            grammar=grammar,
            prediction_token_ids=tuple(prediction),
        )

    async def complete(self, req: ChatCompletionRequest, gen: GenerationRequest) -> ChatCompletion:
        (collected,), usage = await self.collect(req.model, [gen])
        choices = [
            ChatChoice(
                index=i,
                message=_message(choice.text, calls := _calls(req, choice.text)),
                finish_reason="tool_calls" if calls else choice.finish_reason,
                logprobs=_logprobs(choice.logprobs) if gen.params.logprobs else None,
            )
            for i, choice in enumerate(collected)
        ]
        if self.output_check is not None:
            await self.output_check([choice.text for choice in collected])
        response = ChatCompletion(id=gen.request_id, created=now(), model=req.model, choices=choices, usage=usage)
        if req.prompt_logprobs is not None:
            response.prompt_logprobs = vllm_prompt_logprobs(collected[0].prompt_logprobs, req.prompt_logprobs)
        if req.store:
            await self._store(req, response)
        return response

    def stream(self, req: ChatCompletionRequest, gen: GenerationRequest) -> AsyncIterator[str]:
        streamed = [CollectedChoice() for _ in range(gen.params.n)]
        tally = UsageMeter(self.ctx, req.model, len(gen.prompt_token_ids))  # the stored copy's usage, never charged

        def choices_of(delta: GenerationDelta) -> list[ChunkChoice]:
            streamed[delta.index].text += delta.text
            if delta.finish_reason is not None:
                streamed[delta.index].finish_reason = finish_reason(delta.finish_reason)
            tally.count(delta)
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
        tools = tools_in_play(req.tools, req.tool_choice)
        held = [HeldCalls(tools) for _ in range(gen.params.n)]
        chunks = _holding_calls(choices_of, held) if tools else choices_of
        events = self.stream_events(req, gen, ChatCompletionChunk, opening, chunks)
        if not req.store:
            return events

        def whole() -> ChatCompletion:
            usage = tally.usage()
            choices = [
                ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish_reason)
                for i, c in enumerate(streamed)
            ]
            return ChatCompletion(id=gen.request_id, created=now(), model=req.model, choices=choices, usage=usage)

        return self._stored_when_done(req, events, whole)

    async def _stored_when_done(
        self, req: ChatCompletionRequest, events: AsyncGenerator[str, None], whole: Callable[[], ChatCompletion]
    ) -> AsyncIterator[str]:
        """``events``, the completion they add up to stored before the closing ``[DONE]`` (so a
        client that saw it can retrieve it); a stream that failed or was left is not stored."""
        try:
            async for event in events:
                if event == SSE_DONE:
                    await self._store(req, whole())
                yield event
        finally:
            await events.aclose()

    async def _store(self, req: ChatCompletionRequest, response: ChatCompletion) -> None:
        fields = {"temperature", "top_p", "n", "max_tokens", "max_completion_tokens", "seed", "stop", "user"}
        fields |= {"presence_penalty", "frequency_penalty"}
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
        await asyncio.to_thread(
            self.ctx.platform.completions.save,
            completion_id=response.id,
            tenant=self.ctx.tenant,
            key_id=self.ctx.key.id,
            model=req.model,
            messages=messages,
            request=req.model_dump(include=fields, exclude_none=True),
            response=response.model_dump(mode="json"),
            metadata=check_metadata(req.metadata),
        )


def _calls(req: ChatCompletionRequest, text: str) -> list[ToolCall] | None:
    tools = tools_in_play(req.tools, req.tool_choice)
    return parse_tool_calls(text, tools) if tools else None


def _message(text: str, calls: list[ToolCall] | None) -> AssistantMessage:
    if not calls:
        return AssistantMessage(content=text)
    out = [ToolCallOut(id=c.id, function=FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls]
    return AssistantMessage(content=None, tool_calls=out)


def _holding_calls(
    choices_of: Callable[[GenerationDelta], list[ChunkChoice]], held: list[HeldCalls]
) -> Callable[[GenerationDelta], list[ChunkChoice]]:
    """``choices_of`` with text that may be a tool call held back (``HeldCalls``), and a call sent,
    when its choice ends, as the ``openai`` client assembles it: a delta naming it (with its id),
    then its arguments, then the finish reason ``tool_calls``."""

    def holding(delta: GenerationDelta) -> list[ChunkChoice]:
        hold = held[delta.index]
        text = hold.push(delta.text)
        if delta.finish_reason is None:
            return choices_of(dataclasses.replace(delta, text=text)) if text or not hold.held else []
        rest, calls = hold.finish()
        if not calls:
            return choices_of(dataclasses.replace(delta, text=text + rest))
        out = []
        for j, call in enumerate(calls):
            named = ToolCallDelta(
                index=j, id=call.id, type="function", function=FunctionDelta(name=call.name, arguments="")
            )
            given = ToolCallDelta(index=j, function=FunctionDelta(arguments=call.arguments))
            out += [ChunkChoice(index=delta.index, delta=ChoiceDelta(tool_calls=[d])) for d in (named, given)]
        return [*out, ChunkChoice(index=delta.index, delta=ChoiceDelta(), finish_reason="tool_calls")]

    return holding


def _logprobs(tokens: Sequence[TokenLogprob]) -> ChoiceLogprobs:
    return ChoiceLogprobs(content=[logprob_out(x) for x in tokens])
