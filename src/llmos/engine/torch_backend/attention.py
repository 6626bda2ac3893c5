"""A decode step's attention: one new token per row over that row's cached keys and values.

One row over a short cache attends through torch's SDPA (the kernel the model's forward uses,
so bit-equal to it). Everything else runs ``grouped_attention``: two batched products per
key/value head with the softmax between them, each a single pass in the cache's dtype. Its
passes over rows, heads and cached positions are the part of a many-row step that grows with
the rows (docs/performance.md, "Where a decode step's time goes"), so there are as few of them
as the formula allows: no float32 copy of the scores, no scaling pass, no second cast.

oneDNN compiles a primitive for every shape of a bf16 product, and the grouped products' shape
follows the cached width, one position wider every step: each step compiled two new primitives,
which cost more than running them. So they read the cache in whole blocks of ``WIDTH_BLOCK``
positions (``StepWindow``), the positions past the attended ones masked, and consecutive steps
meet the same primitives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

# One row over at most this many cached positions attends through torch's SDPA (faster there, and
# bit-equal to the model's forward); beyond, SDPA's cost grows with the length and the grouped
# products win (docs/performance.md, design measurements).
SDPA_MAX_POSITIONS = 128
# Torch's CPU build runs float32 batched products through BLAS, which reads the cached keys'
# transposed slice in place: the scores then come out in the order the softmax reads, with no copy
# (docs/performance.md, "Where a decode step's time goes"). A bf16 product goes through
# oneDNN where the CPU has bf16 instructions, and torch copies such a slice for it first.
READS_TRANSPOSED_SLICES = frozenset({torch.float32})
# The grouped products read the cache in whole blocks of this many positions, so that oneDNN
# compiles their primitives once a block, not once a step (docs/performance.md, "Where a decode
# step's time goes"). Kept within the cache's ``MIN_SPARE``, so that a buffer's spare room holds
# the block.
WIDTH_BLOCK = 16


def uses_sdpa(rows: int, positions: int) -> bool:
    """Whether a step of ``rows`` rows over ``positions`` cached positions attends through SDPA."""
    return rows == 1 and positions <= SDPA_MAX_POSITIONS


def block_width(positions: int) -> int:
    """``positions`` rounded up to a whole number of blocks."""
    return -(-positions // WIDTH_BLOCK) * WIDTH_BLOCK


@dataclass(frozen=True)
class StepWindow:
    """What a decode step's attention reads of every layer's cache: its first ``width`` positions
    (the attended ``seen`` ones, rounded up to a whole block for the grouped products), of which
    ``masked`` (rows, 1, 1, width) marks those not attended: a row's left padding and every
    position from ``seen`` on (None where every position is attended). The products then multiply
    the masked positions' values by a probability of exactly zero. It is shaped to broadcast over
    the heads once a step, not once a layer: at one row a step's operators cost more to call than
    to run."""

    width: int
    masked: torch.Tensor | None

    @classmethod
    def of(cls, rows: int, seen: int, padding: torch.Tensor | None) -> StepWindow:
        """The window of ``rows`` rows attending the first ``seen`` cached positions; ``padding``:
        (rows, seen) bool, True at a row's left padding, or None where there is none."""
        width = seen if uses_sdpa(rows, seen) else block_width(seen)
        if width == seen:
            masked = padding
        elif padding is None:
            masked = (torch.arange(width) >= seen).expand(rows, width)
        else:
            masked = F.pad(padding, (0, width - seen), value=True)
        return cls(width, None if masked is None else masked[:, None, None, :])

    def attend(self, q: torch.Tensor, layer: Any, scale: float) -> torch.Tensor:
        """``q``'s attention over ``layer``'s cache (a ``kv_cache.GrowingLayer``) through this window."""
        keys, values = layer.read(self.width)
        masked = self.masked
        if masked is not None and keys.shape[2] < self.width:  # a buffer held back by its limit
            masked = masked[..., : keys.shape[2]]
        return step_attention(q, keys, values, masked, scale)


def step_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, masked: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """A decode step's attention of one new token per row (``q``: (rows, heads, 1, dim)) over
    ``keys``/``values`` (rows, kv_heads, positions, dim); ``masked``: (rows, 1, 1, positions) bool,
    True at the positions a row does not attend (its left padding, a window's positions past the
    attended ones), or None where it attends all. Returns (rows, 1, heads * dim)."""
    rows, heads, _, dim = q.shape
    if uses_sdpa(rows, keys.shape[2]):
        mask = None if masked is None else ~masked
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=keys.shape[1] != heads)
        return o.transpose(1, 2).reshape(rows, 1, heads * dim)
    return grouped_attention(q, keys, values, masked, scale)


def grouped_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, masked: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``softmax(q·keysᵀ·scale + mask)·values`` for one query per row, written as two batched
    products per key/value head; arguments as ``step_attention``'s.

    torch's CPU ``scaled_dot_product_attention`` is slow for many rows of one query each (about
    ten times slower than this for 16 rows over a few hundred cached positions; docs/performance.md,
    design measurements). The query heads sharing a key/value head are grouped instead of the keys
    and values being repeated.

    The scale multiplies the query, a number per row, head and dimension, not the scores (one per
    row, head and cached position). For a head size that is a power of four (64, 256) the scale is
    a power of two, so the scores are bit for bit those of scaling after the product; otherwise
    they differ by the query's rounding. The scores stay in the cache's dtype: torch's softmax
    reads bf16 and computes in float32 by itself, rounding once on output, so the float32 copy of
    the scores and the cast of the probabilities back (the largest copies of a many-row step) are
    gone. Its probabilities are those of a float32 softmax rounded to bf16 but for an occasional
    last bit (its exponent and sum are vectorised differently). In float32 the step copies nothing:
    the scores are the product ``q·keysᵀ`` as it comes out.
    """
    rows, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = (q * scale).reshape(rows, kv_heads, heads // kv_heads, dim)  # head h reads kv head h // group
    if keys.dtype in READS_TRANSPOSED_SLICES:
        scores = torch.matmul(grouped, keys.transpose(2, 3))
    else:
        # keys @ q.T, not q @ keys.T: oneDNN takes an operand only dense or densely transposed, so
        # torch copies the cached keys' transposed slice of a growing buffer whole, the layer's whole
        # cache every step. The scores' transpose is copied instead, a group's few numbers a position.
        scores = torch.matmul(keys, grouped.transpose(2, 3)).transpose(2, 3).contiguous()
    if masked is not None:
        scores.masked_fill_(masked, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, values).reshape(rows, 1, heads * dim)
