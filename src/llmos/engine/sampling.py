"""Batched next-token selection: penalties, temperature, nucleus (top-p), seeded sampling, logprobs.

Pure tensor functions, one row per sequence, so a batch can mix greedy and sampled
requests with different parameters, and each is unit-tested without a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass
class BatchSampling:
    """Per-row sampling parameters as tensors (built once per batch, sliced as rows leave)."""

    temperature: torch.Tensor  # (B,) 0 means greedy
    top_p: torch.Tensor  # (B,)
    presence: torch.Tensor  # (B,)
    frequency: torch.Tensor  # (B,)
    generators: list[torch.Generator | None]

    def select(self, keep: torch.Tensor) -> BatchSampling:
        rows = keep.tolist()
        return BatchSampling(
            self.temperature[keep],
            self.top_p[keep],
            self.presence[keep],
            self.frequency[keep],
            [self.generators[i] for i in rows],
        )

    def concat(self, other: BatchSampling) -> BatchSampling:
        return BatchSampling(
            torch.cat([self.temperature, other.temperature]),
            torch.cat([self.top_p, other.top_p]),
            torch.cat([self.presence, other.presence]),
            torch.cat([self.frequency, other.frequency]),
            self.generators + other.generators,
        )

    @property
    def uses_penalties(self) -> bool:
        return bool((self.presence != 0).any() or (self.frequency != 0).any())


def concat_counts(
    mine: torch.Tensor | None, rows: int, theirs: torch.Tensor | None, their_rows: int, vocab: int
) -> torch.Tensor | None:
    """Token counts of two groups of rows joined (a group without penalties has none yet: zeros)."""
    if mine is None and theirs is None:
        return None
    first = mine if mine is not None else torch.zeros(rows, vocab)
    second = theirs if theirs is not None else torch.zeros(their_rows, vocab)
    return torch.cat([first, second])


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's definition: logit -= frequency * count + presence * (count > 0)."""
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside the smallest set whose probability reaches ``top_p`` (row-wise)."""
    if bool((top_p >= 1.0).all()):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
    drop_sorted = before >= top_p[:, None]
    drop_sorted[..., 0] = False  # the most likely token stays, at top_p 0 too (the API admits 0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sampling_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The distribution each row's token is sampled from: its logits over its temperature, outside
    its nucleus (top-p) masked, softmaxed; a greedy row (temperature 0) is taken at temperature 1
    (its token is the argmax instead)."""
    temps = torch.where(temperature == 0, torch.ones_like(temperature), temperature)
    return torch.softmax(apply_top_p(logits / temps[:, None], top_p), dim=-1)


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``probs`` (rows of weights, not necessarily summing to 1), drawn with
    the row's generator (None: torch's global one): the first token whose cumulative weight (in
    float64) exceeds one uniform number times the row's total, so a token of weight 0 is never
    drawn. Each row draws a single number from its generator: ``torch.multinomial`` draws one per
    vocabulary entry, about a millisecond a row for a 49k vocabulary on a CPU, which made sampling
    a third of a 16-row decode step (docs/performance.md). A row whose weights do not sum to a
    positive finite number (NaN logits, everything masked) raises, as ``torch.multinomial`` did:
    the caller fails that row instead of streaming a made-up token."""
    if all(generator is None for generator in generators):
        uniform = torch.rand(len(generators), 1, dtype=torch.float64)
    else:
        uniform = torch.stack([torch.rand(1, dtype=torch.float64, generator=g) for g in generators])
    cumulative = probs.to(torch.float64).cumsum(-1)
    totals = cumulative[:, -1:]
    if not bool(((totals > 0) & torch.isfinite(totals)).all()) or bool((probs < 0).any()):
        raise ValueError("a row's sampling weights are not a distribution (NaN, negative, or all zero)")
    # uniform < 1, so each value is below its row's total and the index within the vocabulary.
    return torch.searchsorted(cumulative, uniform * totals, right=True).squeeze(-1)


def draw_one(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """``draw`` for one distribution (a vector)."""
    return int(draw(probs[None], [generator])[0])


def select_tokens(
    logits: torch.Tensor, sampling: BatchSampling, fixed: Mapping[int, int] | None = None
) -> torch.Tensor:
    """Choose one token per row: argmax where temperature is 0, else a (seeded) sample. Rows in
    ``fixed`` get the token given there and draw nothing from their generator."""
    greedy = sampling.temperature == 0
    chosen = torch.argmax(logits, dim=-1)
    fixed = fixed or {}
    for row, token in fixed.items():
        chosen[row] = token
    if bool(greedy.all()):
        return chosen
    rows = [row for row in torch.nonzero(~greedy).flatten().tolist() if row not in fixed]
    if rows:
        sampled = torch.tensor(rows)
        probs = sampling_probs(logits[sampled], sampling.temperature[sampled], sampling.top_p[sampled])
        chosen[sampled] = draw(probs, [sampling.generators[row] for row in rows])
    return chosen


def token_logprobs(logp: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens and the ``k`` most likely ones, from ``logp``: the
    model's distribution, log-softmaxed before temperature, top-p and grammar masks (as OpenAI
    reports them)."""
    chosen_lp = logp.gather(-1, chosen[:, None]).squeeze(-1)
    if k > 0:
        top_vals, top_idx = torch.topk(logp, k, dim=-1)
    else:
        top_vals = top_idx = torch.empty((logp.shape[0], 0))
    return chosen_lp, top_vals, top_idx
