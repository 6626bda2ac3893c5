"""Responses API logic: input items (and the stored turns before them) plus, with the
``file_search`` tool, the retrieved chunks -> prompt -> the one generation path -> a response
object, whole or as OpenAI's stream events; kept when ``store`` is true."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from llmos.api.context import RequestContext
from llmos.api.openai.common import GenerationService, SamplingFields, UsageMeter, build_sampling, engine_deltas, now
from llmos.api.openai.responses.schemas import CreateResponse, FileSearchTool, InputMessage
from llmos.api.openai.vector_stores.serving import Retrieval
from llmos.api.sse import sse_event
from llmos.config import Settings
from llmos.engine.protocol import EngineClient, GenerationRequest
from llmos.errors import ContextLengthExceededError, EngineError, InvalidRequestError
from llmos.retrieval.search import SearchHit

DEFAULT_SEARCH_RESULTS = 5
SOURCES_PROMPT = (
    "Answer the user's question from the sources below. If they do not hold the answer, say that you do not know."
)


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def message_item(role: str, text: str, *, annotations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    part: dict[str, Any] = {"type": "input_text", "text": text}
    if role == "assistant":
        part = {"type": "output_text", "text": text, "annotations": annotations or [], "logprobs": []}
    return {"id": item_id("msg"), "type": "message", "role": role, "status": "completed", "content": [part]}


@dataclass
class Prepared:
    """A response ready to generate: its request, this turn's input items and the search done."""

    gen: GenerationRequest
    input_items: list[dict[str, Any]]
    search_call: dict[str, Any] | None = None
    citations: list[dict[str, Any]] = field(default_factory=list)
    message_id: str = field(default_factory=lambda: item_id("msg"))


class ResponsesService(GenerationService):
    def __init__(self, engine: EngineClient, settings: Settings, ctx: RequestContext, retrieval: Retrieval) -> None:
        super().__init__(engine, settings, ctx)
        self.retrieval = retrieval

    async def prepare(self, req: CreateResponse) -> Prepared:
        req.model = await asyncio.to_thread(self.ctx.route_model, req.model, req.user)
        handle = await self.engine.resolve(req.model)
        info = handle.info
        if info.task != "chat" or not info.has_chat_template:
            raise InvalidRequestError(f"model {req.model} is not a chat model", param="model")
        history: list[dict[str, str]] = []
        if req.previous_response_id is not None:
            turns = await asyncio.to_thread(
                self.ctx.platform.responses.history, self.ctx.tenant, req.previous_response_id
            )
            for turn in turns:
                history += [_as_chat(item) for item in turn.input_items]
                history += [_as_chat(item) for item in turn.response["output"] if item["type"] == "message"]
        current = req.messages()
        input_items = [message_item(m.role, m.text()) for m in current]
        prepared = Prepared(gen=None, input_items=input_items)  # type: ignore[arg-type]
        hits: list[SearchHit] = []
        tool = req.tools[0] if req.tools and req.tool_choice != "none" else None
        if tool is not None:
            query = _query(current)
            hits = await self._search(tool, query)
            prepared.search_call = {
                "id": item_id("fs"),
                "type": "file_search_call",
                "status": "completed",
                "queries": [query],
                "results": (
                    [{**_result(h), "score": h.score} for h in hits]
                    if "file_search_call.results" in (req.include or [])
                    else None
                ),
            }
        while True:
            messages = list(history)
            if req.instructions:
                messages.insert(0, {"role": "system", "content": req.instructions})
            if hits:
                messages.append({"role": "system", "content": _sources(hits)})
            messages += [_as_chat(item) for item in input_items]
            prompt = await self.engine.encode_chat(handle, messages)
            fields = SamplingFields(model=req.model, temperature=req.temperature, top_p=req.top_p)
            try:
                params = build_sampling(
                    fields,
                    max_tokens=req.max_output_tokens,
                    prompt_tokens=len(prompt),
                    info=info,
                    settings=self.settings,
                    logprobs=False,
                    top_logprobs=0,
                )
                break
            except ContextLengthExceededError:
                if not hits:
                    raise
                hits = hits[:-1]  # the lowest-ranked source gives way to the question
        prepared.citations = _citations(hits)
        prepared.gen = GenerationRequest(
            request_id=f"resp_{uuid.uuid4().hex}",
            model=req.model,
            prompt_token_ids=prompt,
            params=params,
            tenant=self.ctx.tenant,
            handle=handle,
        )
        return prepared

    async def _search(self, tool: FileSearchTool, query: str) -> list[SearchHit]:
        return await self.retrieval.search_ranked(
            tool.vector_store_ids,
            [query],
            max_results=tool.max_num_results or DEFAULT_SEARCH_RESULTS,
            filters=tool.filters,
            ranking=tool.ranking_options,
        )

    async def complete(self, req: CreateResponse, prepared: Prepared) -> dict[str, Any]:
        (choices,), usage = await self.collect(req.model, [prepared.gen])
        choice = choices[0]
        response = self.response_object(req, prepared, choice.text, "completed")
        if choice.finish_reason == "length":
            response.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
        response["usage"] = _usage(usage.prompt_tokens, usage.completion_tokens)
        await self._keep(req, prepared, response)
        return response

    def stream(self, req: CreateResponse, prepared: Prepared) -> AsyncIterator[str]:
        """OpenAI's events: created, in_progress, the file search call's, the message's item,
        part and text deltas, its citations, and completed (or failed)."""
        meter = UsageMeter(self.ctx, req.model, len(prepared.gen.prompt_token_ids))
        counter = iter(range(1 << 62))

        def event(kind: str, **payload: Any) -> str:
            return sse_event({"type": kind, "sequence_number": next(counter), **payload})

        async def events() -> AsyncIterator[str]:
            response = self.response_object(req, prepared, None, "in_progress")
            yield event("response.created", response=response)
            yield event("response.in_progress", response=response)
            index = 0
            if prepared.search_call is not None:
                call = prepared.search_call
                yield event("response.output_item.added", output_index=0, item={**call, "status": "in_progress"})
                for phase in ("in_progress", "searching", "completed"):
                    yield event(f"response.file_search_call.{phase}", output_index=0, item_id=call["id"])
                yield event("response.output_item.done", output_index=0, item=call)
                index = 1
            where = {"item_id": prepared.message_id, "output_index": index, "content_index": 0}
            item = {"id": prepared.message_id, "type": "message", "role": "assistant", "status": "in_progress"}
            yield event("response.output_item.added", output_index=index, item={**item, "content": []})
            part: dict[str, Any] = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            yield event("response.content_part.added", **where, part=part)
            text, finish = "", None
            try:
                async for delta in engine_deltas(self.engine, prepared.gen, meter, observe=True):
                    if delta.text:
                        text += delta.text
                        yield event("response.output_text.delta", **where, delta=delta.text, logprobs=[])
                    finish = delta.finish_reason or finish
            except EngineError as exc:
                failed = self.response_object(req, prepared, text, "failed")
                failed["error"] = {"code": "server_error", "message": exc.message}
                yield event("response.failed", response=failed)
                return
            finally:
                meter.charge()
            yield event("response.output_text.done", **where, text=text, logprobs=[])
            for number, citation in enumerate(prepared.citations):
                yield event(
                    "response.output_text.annotation.added", **where, annotation_index=number, annotation=citation
                )
            part = {**part, "text": text, "annotations": prepared.citations}
            yield event("response.content_part.done", **where, part=part)
            done = self.response_object(req, prepared, text, "completed")
            yield event("response.output_item.done", output_index=index, item=done["output"][-1])
            if finish == "length":
                done.update(status="incomplete", incomplete_details={"reason": "max_output_tokens"})
            done["usage"] = _usage(meter.prompt_tokens, meter.completion_tokens)
            await self._keep(req, prepared, done)
            yield event("response.incomplete" if finish == "length" else "response.completed", response=done)

        return events()

    def response_object(self, req: CreateResponse, prepared: Prepared, text: str | None, status: str) -> dict[str, Any]:
        output: list[dict[str, Any]] = [prepared.search_call] if prepared.search_call else []
        if text is not None:
            message = message_item("assistant", text, annotations=prepared.citations)
            output.append({**message, "id": prepared.message_id})
        return {
            "id": prepared.gen.request_id,
            "object": "response",
            "created_at": now(),
            "status": status,
            "model": req.model,
            "output": output,
            "instructions": req.instructions,
            "previous_response_id": req.previous_response_id,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature if req.temperature is not None else 1.0,
            "top_p": req.top_p if req.top_p is not None else 1.0,
            "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
            "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
            "store": req.store,
            "metadata": req.metadata or {},
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "user": req.user,
            "error": None,
            "incomplete_details": None,
            "usage": None,
        }

    async def _keep(self, req: CreateResponse, prepared: Prepared, response: dict[str, Any]) -> None:
        if req.store:
            await asyncio.to_thread(self.ctx.platform.responses.save, self.ctx.tenant, response, prepared.input_items)


def _as_chat(item: dict[str, Any]) -> dict[str, str]:
    role = "system" if item["role"] == "developer" else item["role"]
    return {"role": role, "content": "".join(part.get("text", "") for part in item["content"])}


def _query(messages: list[InputMessage]) -> str:
    """What file_search looks for: the turn's last user message (or its last message)."""
    users = [m for m in messages if m.role == "user"]
    return (users or messages)[-1].text()[:4096]


def _sources(hits: list[SearchHit]) -> str:
    blocks = [f"[{number}] {hit.filename}:\n{hit.text}" for number, hit in enumerate(hits, start=1)]
    return SOURCES_PROMPT + "\n\n" + "\n\n".join(blocks)


def _result(hit: SearchHit) -> dict[str, Any]:
    return {"file_id": hit.file_id, "filename": hit.filename, "text": hit.text, "attributes": hit.attributes}


def _citations(hits: list[SearchHit]) -> list[dict[str, Any]]:
    """One ``file_citation`` per file whose chunks the model was given, in rank order."""
    files = list(dict.fromkeys((h.file_id, h.filename) for h in hits))
    return [
        {"type": "file_citation", "file_id": file_id, "filename": filename, "index": number}
        for number, (file_id, filename) in enumerate(files)
    ]


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }
