"""A decode step's attention computes softmax(q·kᵀ·scale + mask)·v: pinned against a float64
reference within bf16 rounding, for SDPA's short single rows and the grouped products alike,
with left padding, grouped query heads and cached keys that are a slice of a larger buffer; a
step's window reads a cache layer in whole blocks and attends only the positions it sees."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llmos.engine.torch_backend.attention import (
    SDPA_MAX_POSITIONS,
    StepWindow,
    block_width,
    grouped_attention,
    step_attention,
)
from llmos.engine.torch_backend.kv_cache import GrowingLayer

HEADS, KV_HEADS = 6, 2


def _inputs(
    rows: int, positions: int, dim: int, padding: list[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """bf16 queries laid out as the lean step makes them (a view of the rotated q/k block), keys
    and values as the cache hands them out (the filled part of a buffer with spare room), and
    the padding mask of rows whose first ``padding[row]`` positions are padding."""
    g = torch.Generator().manual_seed(seed)
    qk = torch.randn(rows, 1, HEADS + KV_HEADS, dim, generator=g).to(torch.bfloat16)
    q = qk[:, :, :HEADS].transpose(1, 2)
    spare = positions + 17
    keys = torch.randn(rows, KV_HEADS, spare, dim, generator=g).to(torch.bfloat16)[:, :, :positions]
    values = torch.randn(rows, KV_HEADS, spare, dim, generator=g).to(torch.bfloat16)[:, :, :positions]
    mask = None
    if any(padding):
        mask = torch.zeros(rows, positions, dtype=torch.bool)
        for row, pad in enumerate(padding):
            mask[row, :pad] = True
    return q, keys, values, mask


def _per_head(padding: torch.Tensor | None) -> torch.Tensor | None:
    """A (rows, positions) mask as the attention takes it: (rows, 1, 1, positions)."""
    return None if padding is None else padding[:, None, None, :]


def _reference(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, padding: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v in float64, each query head reading its key/value head."""
    rows, heads, _, dim = q.shape
    group = heads // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = q.double() @ k.transpose(2, 3) * scale
    if padding is not None:
        scores = scores.masked_fill(padding[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(rows, 1, heads * dim)


@pytest.mark.parametrize(
    ("rows", "positions", "padding"),
    [
        (1, 20, [0]),  # SDPA
        (1, 20, [6]),  # SDPA with a padded row
        (1, SDPA_MAX_POSITIONS + 40, [0]),  # one row past SDPA's length: the grouped products
        (4, 37, [0, 5, 0, 36]),  # rows with their own padding (the last attends one position)
        (3, 300, [0, 0, 0]),
    ],
)
@pytest.mark.parametrize("dim", [64, 8])  # a scale that is a power of two, and one that is not
def test_step_attention_is_the_float64_formula_within_bf16_rounding(
    rows: int, positions: int, padding: list[int], dim: int
) -> None:
    q, keys, values, padding = _inputs(rows, positions, dim, padding, seed=rows * positions + dim)
    scale = dim**-0.5
    got = step_attention(q, keys, values, _per_head(padding), scale)
    want = _reference(q, keys, values, padding, scale)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 1, HEADS * dim)
    # bf16 keeps 8 bits: the scores, the probabilities and the output are each rounded once.
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_grouped_attention_in_float32_is_the_formula_to_float32_rounding() -> None:
    """The same passes in float32 (float32 models) leave nothing but float32 rounding."""
    q, keys, values, padding = _inputs(3, 50, 16, [0, 4, 49], seed=7)
    q, keys, values = q.float(), keys.float(), values.float()
    got = grouped_attention(q, keys, values, _per_head(padding), 16**-0.5)
    want = _reference(q, keys, values, padding, 16**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("limit", [None, 20])  # a buffer with room for the whole block, and one held short of it
def test_a_window_attends_exactly_the_positions_it_sees(limit: int | None) -> None:
    """A step's window reads a cache layer in whole blocks (as far as the buffer's limit lets it):
    the positions past the attended ones, a state a truncation forgot and the zeros after it,
    are excluded, and it computes the formula over the attended positions alone."""
    rows, dim, seen = 3, 64, 17
    q, keys, values, padding = _inputs(rows, seen + 1, dim, [0, 4, 0], seed=11)
    assert padding is not None
    layer = GrowingLayer()
    layer._keys.limit = layer._values.limit = limit  # limit_growth
    layer.update(keys, values)
    layer._keys.length = layer._values.length = seen  # kv_cache.truncate: the last state forgotten
    window = StepWindow.of(rows, seen, padding[:, :seen])
    assert window.width == block_width(seen) > seen
    got = window.attend(q, layer, dim**-0.5)
    want = _reference(q, keys[:, :, :seen], values[:, :, :seen], padding[:, :seen], dim**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


class _Copies(TorchDispatchMode):
    """Counts the copying operators called inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.overloadpacket in (torch.ops.aten.copy_, torch.ops.aten.clone, torch.ops.aten._to_copy):
            self.copies.append(str(func))
        return func(*args, **(kwargs or {}))


def test_grouped_attention_in_float32_copies_neither_the_scores_nor_the_cache() -> None:
    """The part of a many-row step that grows with rows and cached positions is attention's passes
    over them, so a float32 step makes none but the two products, the mask and the softmax: no
    transposed copy of the scores, and the cached keys (a slice of a buffer with spare room) are
    read where they lie."""
    q, keys, values, padding = _inputs(4, 40, 64, [0, 3, 0, 0], seed=5)
    layer = GrowingLayer()  # float32 keys and values as the cache hands them out
    layer.update(keys.float(), values.float())
    keys, values = layer.read(40)
    assert not keys.is_contiguous()  # a slice of a buffer with spare room
    q = q.float()
    with _Copies() as counted:
        grouped_attention(q, keys, values, _per_head(padding), 0.125)
    assert counted.copies == []
