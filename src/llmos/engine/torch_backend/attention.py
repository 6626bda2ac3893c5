"""A decode step's attention: one new token per row over that row's cached keys and values.

One row over a short cache attends through torch's SDPA (the kernel the model's forward uses,
so bit-equal to it). Everything else runs ``grouped_attention``: two batched products per
key/value head with the softmax between them, each a single pass in the cache's dtype. Its
passes over rows, heads and cached positions are the part of a many-row step that grows with
the rows (docs/performance.md, "Where a decode step's time goes"), so there are as few of them
as the formula allows: no float32 copy of the scores, no scaling pass, no second cast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# One row over at most this many cached positions attends through torch's SDPA (faster there, and
# bit-equal to the model's forward); beyond, SDPA's cost grows with the length and the grouped
# products win (docs/performance.md, design measurements).
SDPA_MAX_POSITIONS = 128


def step_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, padding: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """A decode step's attention of one new token per row (``q``: (rows, heads, 1, dim)) over
    ``keys``/``values`` (rows, kv_heads, positions, dim); ``padding``: (rows, positions) bool,
    True at a row's left padding (positions it does not attend), or None where there is none.
    Returns (rows, 1, heads * dim)."""
    rows, heads, _, dim = q.shape
    if rows == 1 and keys.shape[2] <= SDPA_MAX_POSITIONS:
        mask = None if padding is None else ~padding[:, None, None, :]
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=keys.shape[1] != heads)
        return o.transpose(1, 2).reshape(rows, 1, heads * dim)
    return grouped_attention(q, keys, values, padding, scale)


def grouped_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, padding: torch.Tensor | None, scale: float
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
    last bit (its exponent and sum are vectorised differently).
    """
    rows, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = (q * scale).reshape(rows, kv_heads, heads // kv_heads, dim)  # head h reads kv head h // group
    # keys @ q.T, not q @ keys.T: the cached keys are a slice of a growing buffer, and a transposed
    # slice is copied whole before the product, a copy of the layer's whole cache every step. The
    # scores' transpose is copied instead, a group's few numbers per position.
    scores = torch.matmul(keys, grouped.transpose(2, 3)).transpose(2, 3).contiguous()
    if padding is not None:
        scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, values).reshape(rows, 1, heads * dim)
