"""The LoRA bank's matrices regrouped for the lean decode step.

Projections that read the same input (q, k and v; gate and up) share one product with their
stacked ``A`` matrices, and each ``B`` product is added into the fused base output in place
(``addmm_``). For a mixed batch that is 15 operators a layer instead of 28 for the seven
adapted projections one by one; small bf16 products on a CPU cost their call, not their
arithmetic, so the count is what matters. The stacked ``A`` copies are rebuilt whenever the bank
publishes a new view (an adapter loaded or dropped) or the batch's adapters change, and hold
the ``A`` and ``B`` columns of the adapters in use (at most as much memory as the bank's).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmos.engine.torch_backend.lora_bank import BankView, LoraContext

BUILT_KEPT = 2
"""Column sets whose groups are kept: the running batch's and the next packed prefill's."""
OUTPUT_GROUP = "head"
"""The output layer's group: in a packed prefill it reads only each prompt's last position."""


@dataclass(frozen=True)
class _Group:
    a: torch.Tensor  # (P * R, in): the A matrices of the group's P adapted modules, stacked
    parts: tuple[tuple[int, int, torch.Tensor], ...]  # per module: output columns start, end, B (out, R)


class LoraGroups:
    """``apply(y, x, layer, group)`` adds the current rows' adapters to a fused base output ``y``."""

    def __init__(self, layout: list[dict[str, list[tuple[str, int]]]]) -> None:
        """``layout[layer][group]``: the group's module names (as the bank names them) with their
        output widths, in the order their columns appear in the fused output."""
        self.layout = layout
        self._view: BankView | None = None
        self._groups: list[dict[str, _Group | None]] = []
        # Groups built over ``_view`` for the column sets used lately: a decode batch's and a
        # packed prefill's.
        self._built: OrderedDict[tuple[int, ...] | None, list[dict[str, _Group | None]]] = OrderedDict()
        self._masks: dict[int, torch.Tensor] = {}
        self._output_masks: dict[int, torch.Tensor] = {}
        # A group applies one to all of its modules' adapters (those the loaded adapters target).
        self._part_counts = range(1, 1 + max(len(names) for groups in layout for names in groups.values()))

    def prepare(self, ctx: LoraContext, rows: int, last: Sequence[int] | None = None) -> None:
        """Regroup if the bank's view or the adapters in use changed, and build this pass's column
        masks: one per row (a token of a packed prefill), and for the output layer those of the
        rows ``last`` (each prompt's last token) when only they reach it.

        Only the columns of the adapters the rows use are kept (copied out of the bank when that
        is fewer than all): with 32 adapters resident and 16 rows, every product reads half the
        adapter weights it otherwise would. The copies are rebuilt when the set changes (a
        request joins or leaves), which costs far less than reading every resident adapter at
        every step."""
        view = ctx.view
        if ctx.mask is not None:
            mask = ctx.mask.reshape(rows, view.width)
        else:
            assert ctx.span is not None
            mask = torch.zeros((1, view.width), dtype=view.dtype)
            mask[0, ctx.span[0] : ctx.span[1]] = 1
        used = (mask != 0).any(0)
        columns = None if bool(used.all()) else tuple(used.nonzero().flatten().tolist())
        if self._view is not view:  # adapters loaded or dropped: every copy is stale
            self._view = view
            self._built.clear()
        groups = self._built.get(columns)
        if groups is None:
            groups = [{g: _group(view, names, columns) for g, names in layer.items()} for layer in self.layout]
            self._built[columns] = groups
            if len(self._built) > BUILT_KEPT:
                self._built.popitem(last=False)
        self._built.move_to_end(columns)
        self._groups = groups
        if columns is not None:
            mask = mask[:, list(columns)]
        self._masks = {p: mask.repeat(1, p) if p > 1 else mask for p in self._part_counts}
        if last is not None and mask.shape[0] > 1:
            self._output_masks = {p: m[list(last)] for p, m in self._masks.items()}
        else:
            self._output_masks = self._masks

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> torch.Tensor:
        found = self._groups[layer].get(group)
        if found is None:
            return y
        rows = x.numel() // x.shape[-1]
        flat_y = y.view(rows, y.shape[-1])
        parts = len(found.parts)
        masks = self._output_masks if group == OUTPUT_GROUP else self._masks
        h = (x.reshape(rows, x.shape[-1]) @ found.a.T) * masks[parts]
        rank = found.a.shape[0] // parts
        for j, (start, end, b) in enumerate(found.parts):
            flat_y[:, start:end].addmm_(h[:, j * rank : (j + 1) * rank], b.T)
        return y


def _group(view: BankView, names: list[tuple[str, int]], columns: tuple[int, ...] | None) -> _Group | None:
    """The group's stacked ``A`` and its modules' ``B`` (only ``columns`` of them, when given)."""
    a_parts, parts, start = [], [], 0
    for name, width in names:
        ab = view.weights.get(name)
        if ab is not None:
            a, b = ab if columns is None else _columns(ab, columns)
            a_parts.append(a)
            parts.append((start, start + width, b))
        start += width
    if not a_parts:
        return None
    return _Group(a=torch.cat(a_parts) if len(a_parts) > 1 else a_parts[0], parts=tuple(parts))


def _columns(ab: tuple[torch.Tensor, torch.Tensor], columns: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` rows and ``B`` columns ``columns`` of one module: views when they are one range (a
    single adapter, as in most prefills), else copies."""
    a, b = ab
    first, last = columns[0], columns[-1]
    if last - first + 1 == len(columns):
        return a[first : last + 1], b[:, first : last + 1]
    keep = torch.tensor(columns)
    return a.index_select(0, keep), b.index_select(1, keep)
