"""A prompt being prefilled, a chunk at a time between decode steps.

A long prompt computed in one go would pause every running stream for its whole length; run in
chunks of at most ``prefill_chunk_tokens`` per engine iteration, it delays them by one bounded
chunk per step instead (vLLM's chunked prefill). The key/value states of the chunks done so far
live in the job's own cache; the last chunk's logits choose the first token. A request that
scores its prompt keeps every position's logits of each chunk just long enough to score them
(``prompt_scores``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from llmos.engine.torch_backend.kv_cache import cache_argument, new_cache
from llmos.engine.torch_backend.prompt_scores import PromptScores
from llmos.engine.torch_backend.virtual_tokens import States


@dataclass
class Prefill:
    pending: Any  # the runner's queued request
    prompt: list[int]
    lead: int  # cache positions before the prompt (an adapter's virtual tokens)
    cache: DynamicCache
    done: int  # prompt tokens whose states are in ``cache`` (cached prefix included)
    logits: torch.Tensor | None = None  # (1, vocab) after the last chunk
    admitted: int = 0  # the runner's prefill pass count when the job was admitted (``prefill_order``)
    scores: PromptScores | None = None  # the prompt's tokens scored so far, when the request asks

    @classmethod
    def start(
        cls,
        pending: Any,
        config: Any,
        prompt: list[int],
        lead: int,
        start: int,
        states: States,
        scores: PromptScores | None = None,
    ) -> Prefill:
        """A job whose first ``start`` prompt tokens (and ``lead`` virtual ones) have the given
        states (and, when it scores its prompt, the scores of the tokens up to ``start``)."""
        cache = new_cache(config)
        for layer, (keys, values) in enumerate(states):
            cache.update(keys, values, layer)
        return cls(pending, prompt, lead, cache, start, scores=scores)

    @property
    def remaining(self) -> int:
        return len(self.prompt) - self.done

    def run(self, model: Any, tokens: int) -> None:
        """Compute the next ``tokens`` prompt tokens' states (and logits, which only the last chunk
        needs) with the model's forward."""
        end = min(len(self.prompt), self.done + tokens)
        out = model(
            input_ids=torch.tensor([self.prompt[self.done : end]]),
            attention_mask=torch.ones((1, self.lead + end), dtype=torch.long),
            position_ids=torch.arange(self.lead + self.done, self.lead + end)[None],
            use_cache=True,
            logits_to_keep=0 if self.scores is not None else 1,  # 0: every position's
            **{cache_argument(model): self.cache},
        )
        self.took(out.logits[0], end)

    def took(self, logits: torch.Tensor, end: int) -> None:
        """The chunk up to prompt position ``end`` has run: ``logits`` are its positions' (every
        one when scoring, else its last)."""
        if self.scores is not None:
            # Position i predicts prompt token i + 1; the prompt's last position predicts none of it.
            targets = self.prompt[self.done + 1 : end + 1]
            self.scores.add(logits[: len(targets)], targets)
        self.done = end
        self.logits = logits[-1:].float()


def prefill_order(jobs: Iterable[Prefill], budget: int) -> list[Prefill]:
    """The order in which waiting prompts get prefill tokens: fewest remaining first, each pass
    a job waits counting as ``budget`` tokens fewer.

    A crowd of requests arriving together (a burst of clients) gets its first tokens far sooner
    on median this way than first come, first served: each pass's ``budget`` tokens finish as
    many prompts as they can instead of one long prompt's chunk delaying the short ones behind
    it (16 requests of 20-70 tokens at a 256-token budget: 8 first tokens after the first pass
    instead of 5). The ageing bounds the wait: a job of ``n`` remaining tokens is overtaken by
    later arrivals for at most ``n / budget`` passes, so no prompt starves behind a stream of
    shorter ones. Ties keep arrival order."""
    return sorted(jobs, key=lambda job: job.remaining + budget * job.admitted)


def plan_chunks(
    jobs: Iterable[Prefill], budget: int, pass_budget: int, scoring_tokens: int | None, *, yield_step: bool = False
) -> list[tuple[Prefill, int]]:
    """The chunk of each job this step prefills, ``(job, tokens)``, within ``budget`` tokens:
    prompts that generate first, then scoring ones (``GenerationRequest.scoring``), each part in
    ``prefill_order`` (``pass_budget`` its ageing unit); scoring prompts take at most
    ``scoring_tokens`` of the step when it is given (generating work is about), and none at all
    when ``yield_step`` and a generating prompt is planned: the pass that computes an arrival's
    first token then holds no scored positions (their every-position logits, log-softmax and top-k
    would be computed before that first token is chosen). The caller gives ``yield_step`` only
    when the previous step did not yield, so scoring keeps at least every other step.

    A job whose prompt ends in the step has its rows decode in it too, so each of them is kept a
    token of the budget (its chunk stops a token short where there is none)."""
    planned: list[tuple[Prefill, int]] = []
    scoring_left = budget if scoring_tokens is None else min(budget, scoring_tokens)
    for job in sorted(prefill_order(jobs, pass_budget), key=lambda job: job.pending.request.scoring):
        scoring = job.pending.request.scoring
        if scoring and yield_step and planned:  # ``planned`` holds generating prompts only, here
            break
        room = min(budget, scoring_left) if scoring else budget
        take = min(job.remaining, room)
        if take == job.remaining and take + job.pending.rows > room:
            take = room - job.pending.rows
        if take <= 0:
            continue
        used = take + (job.pending.rows if take == job.remaining else 0)
        budget -= used
        if scoring:
            scoring_left -= used
        planned.append((job, take))
    return planned


def run_packed(decoder: Any, planned: list[tuple[Prefill, int]], lora: Any = None) -> None:
    """The next chunk of each job, ``(job, tokens)``, in one pass of ``decoder.prefill`` (the
    lean layers, several prompts packed together; ``lora`` prepared with one entry per token);
    a job scoring its prompt gets every position's logits, the others their chunk's last."""
    chunks = []
    for job, tokens in planned:
        end = min(len(job.prompt), job.done + tokens)
        chunks.append((job.prompt[job.done : end], job.lead + job.done, job.cache))
    every = [job.scores is not None for job, _ in planned]
    logits = decoder.prefill(chunks, lora, every=every)
    row = 0
    for (job, _), (chunk, _, _), scored in zip(planned, chunks, every, strict=True):
        rows = len(chunk) if scored else 1
        job.took(logits[row : row + rows], job.done + len(chunk))
        row += rows
