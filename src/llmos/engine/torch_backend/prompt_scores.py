"""A prompt's tokens scored as the model predicts them, a prefill chunk at a time.

Each position's logits are turned into the next prompt token's logprob, its rank and the ``k``
most likely tokens right away, ``SCORE_ROWS`` positions at a time, so a scored prompt holds a
few numbers per token, never a vocabulary-wide row per position: the largest float32 matrices
alive are one prefill pass's logits (at most ``prefill_chunk_tokens`` rows) and one
``SCORE_ROWS``-row log-softmax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llmos.engine.protocol import PromptLogprob

SCORE_ROWS = 64
"""Positions whose log-softmax is computed at once."""


@dataclass
class PromptScores:
    """Scores of a prompt's tokens from its second on (the first has nothing before it)."""

    k: int
    logprobs: list[torch.Tensor] = field(default_factory=list)  # per piece: (T,) float32
    ranks: list[torch.Tensor] = field(default_factory=list)  # (T,) int64
    top_values: list[torch.Tensor] = field(default_factory=list)  # (T, k) float32
    top_ids: list[torch.Tensor] = field(default_factory=list)  # (T, k) int64

    @property
    def length(self) -> int:
        """Prompt tokens scored so far (after the first)."""
        return sum(len(t) for t in self.logprobs)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.logprobs, *self.ranks, *self.top_values, *self.top_ids))

    def add(self, logits: torch.Tensor, targets: Sequence[int]) -> None:
        """Score ``targets`` (T tokens) against ``logits`` (T, vocab), row ``i`` predicting ``targets[i]``."""
        wanted = torch.tensor(list(targets), dtype=torch.long)
        for start in range(0, len(wanted), SCORE_ROWS):
            rows = slice(start, start + SCORE_ROWS)
            lp = torch.log_softmax(logits[rows].float(), dim=-1)
            token = lp.gather(1, wanted[rows, None])[:, 0]
            self.logprobs.append(token)
            self.ranks.append((lp > token[:, None]).sum(dim=-1) + 1)
            values, ids = lp.topk(self.k, dim=-1) if self.k else (lp[:, :0], wanted[rows, None][:, :0])
            self.top_values.append(values)
            self.top_ids.append(ids)

    def first(self, count: int, k: int | None = None) -> PromptScores:
        """The scores of the first ``count`` scored tokens, with at most ``k`` alternatives."""
        k = self.k if k is None else min(k, self.k)
        cut = PromptScores(k)
        if count:
            cut.logprobs = [torch.cat(self.logprobs)[:count]]
            cut.ranks = [torch.cat(self.ranks)[:count]]
            cut.top_values = [torch.cat(self.top_values)[:count, :k]]
            cut.top_ids = [torch.cat(self.top_ids)[:count, :k]]
        return cut

    def entries(self, prompt: Sequence[int], decode: Callable[[list[int]], str]) -> tuple[PromptLogprob, ...]:
        """Every prompt token with its score (``prompt`` fully scored)."""
        assert self.length == len(prompt) - 1, "a prompt is reported once every token is scored"
        first = PromptLogprob(token_id=prompt[0], token=decode([prompt[0]]), logprob=None, rank=None)
        if len(prompt) == 1:
            return (first,)
        logprobs = torch.cat(self.logprobs).tolist()
        ranks = torch.cat(self.ranks).tolist()
        values, ids = torch.cat(self.top_values).tolist(), torch.cat(self.top_ids).tolist()
        out = [first]
        for i, token in enumerate(prompt[1:]):
            top = tuple((t, decode([t]), v) for t, v in zip(ids[i], values[i], strict=True))
            out.append(PromptLogprob(token, decode([token]), logprobs[i], int(ranks[i]), top))
        return tuple(out)
