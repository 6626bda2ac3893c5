"""How relevant a document is to a query, from a chat or completion model: the probability of a
yes answer to a fixed relevance prompt, from its scored prompt (``SamplingParams.prompt_logprobs``).

Every pair is scored twice, ending in `` yes`` and in `` no``, and the relevance is
``P(yes) / (P(yes) + P(no))``: a model's raw ``P(yes)`` also reflects how likely it finds any
answer there, which the ratio cancels. The pairs' requests go to the engine together (up to
``in_flight`` at a time, so a long list neither fills the engine's pending limit nor starves other
clients), admitted by its scheduler and prefilled together in packed passes, as one scoring job;
if one fails, the others are cancelled.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Sequence
from typing import Any

from llmos.engine.protocol import EngineClient, GenerationRequest, ModelHandle, PairScores, SamplingParams
from llmos.errors import ContextLengthExceededError, EngineError

RELEVANCE_PROMPT = (
    "Judge whether the document answers the query.\n"
    "Query: {query}\n"
    "Document: {document}\n"
    "Is the document relevant to the query? Answer yes or no.\n"
    "Answer:"
)
ANSWERS = (" yes", " no")
IN_FLIGHT = 32
"""Scoring requests of one call waiting in the engine at once, at most."""


async def _fitted(engine: EngineClient, model: ModelHandle, query: str, document: str) -> str:
    """``document`` cut from its end until the relevance prompt with the longer answer fits the
    model's context: each round drops the excess tokens' share of the document's characters."""
    longest = max(ANSWERS, key=len)
    frame = 0  # the prompt's tokens without a document, counted once a cut is needed
    while document:
        full = await engine.encode_text(model, RELEVANCE_PROMPT.format(query=query, document=document) + longest)
        excess = len(full) - model.info.context_length
        if excess <= 0:
            break
        if not frame:
            empty = RELEVANCE_PROMPT.format(query=query, document="") + longest
            frame = len(await engine.encode_text(model, empty))
        share = -(-len(document) * excess // max(1, len(full) - frame))  # rounded up
        document = document[: max(0, len(document) - share)]
    return document


async def relevance_by_answer(
    engine: EngineClient,
    model: ModelHandle,
    pairs: Sequence[tuple[str, str]],
    *,
    tenant: str,
    in_flight: int,
    truncate: bool = False,
) -> PairScores:
    """``P(yes) / (P(yes) + P(no))`` of every pair under ``RELEVANCE_PROMPT``; with ``truncate`` a
    document too long for the prompt is cut to its beginning that fits."""
    # (prompt, prompt with the answer) token ids: the answer's tokens are those after the prompt's.
    encoded: list[tuple[list[int], list[int]]] = []
    for i, (query, document) in enumerate(pairs):
        if truncate:
            document = await _fitted(engine, model, query, document)
        text = RELEVANCE_PROMPT.format(query=query, document=document)
        prompt = await engine.encode_text(model, text)
        for answer in ANSWERS:
            full = await engine.encode_text(model, text + answer)
            if len(full) > model.info.context_length:
                raise ContextLengthExceededError(
                    f"pair {i} takes {len(full)} tokens in the relevance prompt; this model's context is "
                    f"{model.info.context_length}",
                    param="documents",
                )
            encoded.append((prompt, full))
    base = uuid.uuid4().hex[:16]
    params = SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=0)

    slots = asyncio.Semaphore(in_flight)

    async def answer_logprob(i: int, prompt: list[int], full: list[int]) -> float:
        request = GenerationRequest(f"rel-{base}-{i}", model.name, full, params, tenant=tenant, handle=model)
        scored: tuple[Any, ...] = ()
        async with slots:
            async for delta in engine.generate(request):
                if delta.error is not None:
                    raise EngineError(delta.error)
                scored = delta.prompt_logprobs or scored
        return sum(s.logprob or 0.0 for s in scored[len(prompt) :])

    async with asyncio.TaskGroup() as group:  # one failure cancels the rest
        tasks = [group.create_task(answer_logprob(i, p, f)) for i, (p, f) in enumerate(encoded)]
    logprobs = [task.result() for task in tasks]
    scores = [1 / (1 + math.exp(min(no - yes, 700.0))) for yes, no in zip(logprobs[::2], logprobs[1::2], strict=True)]
    return PairScores(scores=scores, prompt_tokens=sum(len(full) for _, full in encoded))
