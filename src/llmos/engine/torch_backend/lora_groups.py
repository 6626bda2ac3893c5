"""The LoRA bank's matrices regrouped for the lean decode step.

Small bf16 products on a CPU cost their call, not their arithmetic, so what counts
is how many there are. Projections that read the same input (q, k and v; gate and up) share one
``A`` product with their stacked ``A`` matrices, or none at all where the base product computes
it (``fused_weights``); and each group's ``B`` matrices form one block-diagonal matrix whose
product is added to the group's base output in the same oneDNN call. A mixed batch then costs
at most three operators a group (``A``, mask, ``B``), 12 a layer, instead of 28 for the seven
adapted projections one by one.

The copies hold the columns of the adapters the rows use (``A`` rows, ``B`` columns), so a batch
using 16 of 32 resident adapters reads half the adapter weights it otherwise would. Rebuilding
them costs tens of milliseconds, so a set of columns built for the running batch is kept while
the batch's adapters stay among them and fill at least half of them: requests leaving never
cost a rebuild, and one joining only when its adapter is new to the set.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmos.engine.torch_backend.lora_bank import BankView, LoraContext
from llmos.engine.torch_backend.lora_expand import MAX_ROWS, LoraExpand
from llmos.engine.torch_backend.packed import Matrix

BUILT_KEPT = 2
"""Column sets whose groups are kept: the running batch's and the next packed prefill's."""
OUTPUT_GROUP = "head"
"""The output layer's group: in a packed prefill it reads only each prompt's last position."""
MAX_SPARE = 2
"""A decode batch's kept columns are rebuilt when it uses less than 1/MAX_SPARE of them ..."""
SHRINK_AFTER = 64
"""... for this many steps in a row."""
BLOCK_MAX_COLUMNS = 64
"""A decode step's ``B`` products are one block-diagonal product per group up to this many
columns: at 64 (8 rank-8 adapters) the one product beats the products module by module; at 128
it gains nothing for twice the memory (the block's zeros: two thirds of q/k/v's, half of
gate/up's; docs/performance.md, design measurements). The decode batch's kept columns
grow by a newcomer's up to this many too; beyond, each new set of adapters is copied anew, as few
columns as the batch uses (reading 32 adapters' columns for 16 in use cost more than copying)."""

Columns = tuple[int, ...] | None  # None: every column of the view
Layout = list[dict[str, list[tuple[str, int]]]]
"""Per layer, each group's module names (as the bank names them) with their output widths, in the
order their columns appear in the group's fused output."""


@dataclass(frozen=True)
class _Group:
    a: torch.Tensor | None  # (P * R, in): the A matrices of the group's P adapted modules, stacked
    # (None where the base product computes them: see fused_weights)
    parts: tuple[tuple[int, int, torch.Tensor], ...]  # per module: output columns start, end, B (out, R)
    block: Matrix | None  # decode: the Bs as one block-diagonal (out, P * R) matrix, zeros elsewhere


@dataclass(frozen=True)
class _Built:
    groups: list[dict[str, _Group | None]]  # per layer, by group
    picks: dict[int, torch.Tensor]  # fused: per part count, the A output columns the rows use


class LoraGroups:
    """``apply(y, x, layer, group)`` adds the current rows' adapters to a fused base output ``y``."""

    def __init__(self, layout: Layout, expand: LoraExpand | None = None) -> None:
        """``layout[layer][group]``: the group's module names (as the bank names them) with their
        output widths, in the order their columns appear in the fused output. ``expand``: the
        native kernel for fused decode steps (None: the torch path for every pass)."""
        self.layout = layout
        self.expand = expand
        self._expanding = False  # this pass adds the B products by the kernel
        self._view: BankView | None = None
        self._groups: list[dict[str, _Group | None]] = []
        # Groups built over ``_view`` for the column sets used lately, by (columns, fused, decode):
        # a decode batch's and a packed prefill's.
        self._built: OrderedDict[tuple[Columns, bool, bool], _Built] = OrderedDict()
        self._decode: Columns = ()  # the decode batch's kept columns (none yet)
        self._sparse_steps = 0  # decode steps in a row using less than 1/MAX_SPARE of them
        self._masks: dict[int, torch.Tensor] = {}
        self._output_masks: dict[int, torch.Tensor] = {}
        self._picks: dict[int, torch.Tensor] = {}
        self.copy_bytes = 0
        """Memory held by the kept groups' copies of adapter columns (views of the bank's are free)."""
        # A group applies one to all of its modules' adapters (those the loaded adapters target).
        self._part_counts = range(1, 1 + max(len(names) for groups in layout for names in groups.values()))

    @property
    def columns(self) -> Columns:
        """The column set the current groups were built over."""
        return next(reversed(self._built))[0] if self._built else None

    def prepare(
        self,
        ctx: LoraContext,
        rows: int,
        last: Sequence[int] | None = None,
        *,
        fused: bool = False,
        decode: bool = False,
    ) -> None:
        """Regroup if the bank's view changed or the adapters in use are not among the kept
        columns, and build this pass's column masks: one per row (a token of a packed prefill),
        and for the output layer those of the rows ``last`` (each prompt's last token) when only
        they reach it. ``fused``: the base products compute every resident adapter's ``A``
        output (``apply_fused``), so no ``A`` copies are kept, only which columns to read.
        ``decode``: a decode step, whose columns are kept while its adapters come and go."""
        view = ctx.view
        if ctx.mask is not None:
            mask = ctx.mask.reshape(rows, view.width)
        else:
            assert ctx.span is not None
            mask = torch.zeros((1, view.width), dtype=view.dtype)
            mask[0, ctx.span[0] : ctx.span[1]] = 1
        if self._view is not view:  # adapters loaded or dropped: every copy is stale
            self._view = view
            self._built.clear()
            self._groups = []
            self.copy_bytes = 0
            self._decode = ()
        self._expanding = (
            decode and fused and self.expand is not None and rows <= MAX_ROWS and view.dtype == self.expand.dtype
        )
        if self._expanding:
            assert self.expand is not None
            self.expand.prepare(view, mask, rows)
            return
        used = frozenset((mask != 0).any(0).nonzero().flatten().tolist())
        if not used:  # every row's adapter went away since it was admitted: any column will do
            used = frozenset({0})
        columns = self._decode_columns(used, view.width) if decode else _as_columns(used, view.width)
        key = (columns, fused, decode)
        built = self._built.get(key)
        if built is None:
            built = self._build(view, columns, fused, decode)
            self._built[key] = built
            if len(self._built) > BUILT_KEPT:
                self._built.popitem(last=False)
            bank = {t.untyped_storage().data_ptr() for ab in view.weights.values() for t in ab}
            self.copy_bytes = sum(
                _copy_bytes(g, bank) for kept in self._built.values() for layer in kept.groups for g in layer.values()
            )
        self._built.move_to_end(key)
        self._groups, self._picks = built.groups, built.picks
        if columns is not None:
            mask = mask[:, list(columns)]
        self._masks = {p: mask.repeat(1, p) if p > 1 else mask for p in self._part_counts}
        if last is not None and mask.shape[0] > 1:
            self._output_masks = {p: m[list(last)] for p, m in self._masks.items()}
        else:
            self._output_masks = self._masks

    def _build(self, view: BankView, columns: Columns, fused: bool, decode: bool) -> _Built:
        groups = [{g: _group(view, n, columns, fused, decode) for g, n in layer.items()} for layer in self.layout]
        picks = {}
        if fused and columns is not None:  # the columns of each part's A output the rows use
            for p in self._part_counts:
                picks[p] = torch.tensor([part * view.width + c for part in range(p) for c in columns])
        return _Built(groups, picks)

    def _decode_columns(self, used: frozenset[int], width: int) -> Columns:
        """The decode batch's columns: the kept ones while they hold every adapter in use (grown
        by a newcomer's), rebuilt smaller only after ``SHRINK_AFTER`` steps in a row using less
        than 1/``MAX_SPARE`` of them (a batch's adapters come and go; a rebuild costs tens of ms)."""
        held = frozenset(range(width) if self._decode is None else self._decode)
        chosen = held
        if not used <= held:
            grown = held | used
            chosen = grown if len(grown) <= BLOCK_MAX_COLUMNS else used
        elif len(held) > MAX_SPARE * len(used):
            self._sparse_steps += 1
            if self._sparse_steps >= SHRINK_AFTER:
                chosen = used
        if chosen is not held or len(held) <= MAX_SPARE * len(used):
            self._sparse_steps = 0
        self._decode = _as_columns(chosen, width)
        return self._decode

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, group: str) -> torch.Tensor:
        """``y`` plus the adapters of the group's product of ``x``."""
        if self._expanding:  # a fused pass: a group without A rows in its product has no adapter
            return y
        found = self._groups[layer].get(group)
        if found is None:
            return y
        assert found.a is not None, "prepared for fused products"
        rows = x.numel() // x.shape[-1]
        return self._add_b(y, x.reshape(rows, x.shape[-1]) @ found.a.T, found, group)

    def apply_fused(self, full: torch.Tensor, out: int, layer: int, group: str) -> torch.Tensor:
        """The group's base output plus its adapters, from ``full``: a fused product whose first
        ``out`` columns are the base output and the rest every resident adapter's ``A`` output
        (see fused_weights)."""
        if self._expanding:
            assert self.expand is not None
            self.expand.add(full.view(-1, full.shape[-1]), out, self.layout[layer][group], layer, group)
            return full[..., :out]
        found = self._groups[layer].get(group)
        if found is None:
            return full[..., :out]
        flat = full.view(full.numel() // full.shape[-1], full.shape[-1])
        h = flat[:, out:]
        picks = self._picks.get(len(found.parts))
        h = h if picks is None else h.index_select(1, picks)
        if found.block is None:
            return self._add_b(full[..., :out], h, found, group)
        # The block has zero rows under the A columns: the sum is taken over the whole product
        # (oneDNN would copy a slice of it first) and only the base columns are read after.
        return self._add_b(flat, h, found, group).view(full.shape)[..., :out]

    def _add_b(self, y: torch.Tensor, h: torch.Tensor, found: _Group, group: str) -> torch.Tensor:
        """``y + (h * mask) @ B.T`` for the group's ``B`` matrices (``h``: its A outputs): in one
        product with the block-diagonal matrix (decode), else module by module, in place."""
        masks = self._output_masks if group == OUTPUT_GROUP else self._masks
        parts = len(found.parts)
        h = h * masks[parts]
        if found.block is not None:
            return found.block.added_to(y.reshape(h.shape[0], y.shape[-1]), h).view(y.shape)
        flat_y = y.view(h.shape[0], y.shape[-1])  # a view: the products are added into y itself
        rank = h.shape[1] // parts
        for j, (start, end, b) in enumerate(found.parts):
            flat_y[:, start:end].addmm_(h[:, j * rank : (j + 1) * rank], b.T)
        return y


def _copy_bytes(group: _Group | None, bank: set[int]) -> int:
    """Memory of the group's tensors that are not the bank's own (``bank``: its storages)."""
    if group is None:
        return 0
    tensors = ([] if group.a is None else [group.a]) + [b for _, _, b in group.parts]
    if group.block is not None and group.block.plain is not None:
        tensors.append(group.block.plain)  # unpacked: the block itself (always a copy)
    own = sum(t.numel() * t.element_size() for t in tensors if t.untyped_storage().data_ptr() not in bank)
    return own + (group.block.nbytes if group.block is not None and group.block.packed is not None else 0)


def _as_columns(used: frozenset[int], width: int) -> Columns:
    return None if len(used) == width else tuple(sorted(used))


def _group(view: BankView, names: list[tuple[str, int]], columns: Columns, fused: bool, decode: bool) -> _Group | None:
    """The group's stacked ``A`` (unless ``fused``) and its modules' ``B`` over ``columns`` (all
    when None), for a decode step also as one block-diagonal matrix."""
    a_parts, parts, start = [], [], 0
    for name, width in names:
        ab = view.weights.get(name)
        if ab is not None:
            a, b = ab
            if columns is not None:
                b = _columns(b, columns, 1)
                if not fused:
                    a = _columns(a, columns, 0)
            a_parts.append(a)
            parts.append((start, start + width, b))
        start += width
    if not a_parts:
        return None
    a_all = None if fused else torch.cat(a_parts) if len(a_parts) > 1 else a_parts[0]
    count = view.width if columns is None else len(columns)
    block = _block(parts, start, view.width, fused) if decode and count <= BLOCK_MAX_COLUMNS else None
    return _Group(a=a_all, parts=tuple(parts), block=block)


def _block(parts: list[tuple[int, int, torch.Tensor]], out: int, width: int, fused: bool) -> Matrix:
    """The modules' ``B`` as one block-diagonal matrix over the group's output columns (and, when
    ``fused``, zero rows under the product's ``A`` columns: see ``apply_fused``)."""
    count = parts[0][2].shape[1]
    rows = out + len(parts) * width if fused else out
    block = torch.zeros((rows, count * len(parts)), dtype=parts[0][2].dtype)
    for j, (start, end, b) in enumerate(parts):
        block[start:end, j * count : (j + 1) * count] = b
    return Matrix(block)


def _columns(t: torch.Tensor, columns: tuple[int, ...], dim: int) -> torch.Tensor:
    """Entries ``columns`` of ``t`` along ``dim`` (an adapter's ``A`` rows or ``B`` columns): a view
    when they are one range (a single adapter, as in most prefills), else a copy."""
    first, last = columns[0], columns[-1]
    if last - first + 1 == len(columns):
        return t.narrow(dim, first, len(columns))
    return t.index_select(dim, torch.tensor(columns))
