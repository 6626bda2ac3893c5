"""Many LoRA adapters beside one resident base model, applied to mixed batches.

Every loaded adapter owns a range of columns, the same in every layer: per target layer the
bank keeps all adapters' ``A`` stacked as one (R, in) matrix and their ``B`` as one (out, R)
matrix (zeros where an adapter does not target the layer). One decode step then costs two
small matrix products per adapted layer, whatever the number of adapters in the batch: each
row's ``x @ A_all.T`` is masked to its own adapter's columns before ``@ B_all.T`` (rows
without an adapter have an all-zero mask and get exactly the base output). This is
Punica/S-LoRA's segmented idea in the shape that is cheapest for small CPU batches: no
gathering of per-row weights, no Python loop over adapters.

The engine thread reads ``BankView`` snapshots; loading writes an adapter into free columns (or
widened copies) on the caller's thread and publishes a new view with one assignment, so a load
never stalls decoding of other requests.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from llmos.engine.torch_backend.lora import LoraWeights, linear_shapes
from llmos.errors import ServiceUnavailableError


@dataclass(frozen=True)
class BankView:
    """The adapters resident at one moment: their column ranges and the stacked weights."""

    spans: dict[str, tuple[int, int]]
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module -> (A_all (R, in), B_all (out, R), by column)
    width: int
    serials: dict[str, int] = field(default_factory=dict)
    """Which load of the bank wrote each adapter's columns (copies of them are of that load)."""

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())

    @property
    def dtype(self) -> torch.dtype:
        """The adapters' dtype (that of the masks selecting their columns)."""
        return next(iter(self.weights.values()))[0].dtype if self.weights else torch.float32


EMPTY_VIEW = BankView(spans={}, weights={}, width=0)


@dataclass
class LoraContext:
    """What the adapted layers apply during the current forward pass (set by the engine thread)."""

    view: BankView = EMPTY_VIEW
    span: tuple[int, int] | None = None
    """All rows use one adapter: only its columns are computed (prefill)."""
    mask: torch.Tensor | None = None
    """(B, 1, R): each row's own columns (mixed decode batches)."""

    @property
    def active(self) -> bool:
        return self.span is not None or self.mask is not None


class AdaptedLinear(nn.Module):
    """A base linear layer plus whatever adapter columns the current batch's rows select."""

    def __init__(self, base: nn.Linear, name: str, context: LoraContext) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        delta = self.delta(x)
        return y if delta is None else y + delta

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """What the current rows' adapters add to this layer's output (None: nothing)."""
        ctx = self.context
        if not ctx.active:
            return None
        ab = ctx.view.weights.get(self.name)
        if ab is None:
            return None
        a, b = ab
        if ctx.span is not None:
            start, end = ctx.span
            return (x @ a[start:end].T) @ b[:, start:end].T
        assert ctx.mask is not None
        return ((x @ a.T) * ctx.mask) @ b.T


@dataclass
class _Entry:
    nbytes: int
    refs: int = 0
    doomed: bool = False


@dataclass
class LoraBank:
    """The adapters of one base model: loaded on demand, evicted least recently used when idle."""

    model: nn.Module
    budget_bytes: int
    context: LoraContext = field(default_factory=LoraContext)

    def __post_init__(self) -> None:
        self.shapes = linear_shapes(self.model)
        self.view = EMPTY_VIEW
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()  # entries and views
        self._loading: dict[str, threading.Lock] = {}  # one loader per adapter; others wait for it
        self.loads = 0

    # -- any thread ------------------------------------------------------------------------
    def acquire(self, adapter_id: str, load: Callable[[dict[str, tuple[int, int]]], LoraWeights]) -> None:
        """Make ``adapter_id`` resident and pin it until ``release``; ``load`` reads it from disk."""
        with self._lock:
            if self._pin(adapter_id):
                return
            gate = self._loading.setdefault(adapter_id, threading.Lock())
        with gate:
            with self._lock:
                if self._pin(adapter_id):
                    return
            weights = load(self.shapes)  # outside the bank lock: other adapters stay usable
            with self._lock:
                self._make_room(weights.nbytes)
                self._wrap(weights.modules)
                self._entries[adapter_id] = _Entry(weights.nbytes, refs=1)
                self.loads += 1
                self.view = _with_adapter(self.view, weights, self.loads)
                self._loading.pop(adapter_id, None)

    def release(self, adapter_id: str) -> None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs <= 0 and entry.doomed:
                self._drop(adapter_id)

    def evict(self, adapter_id: str) -> None:
        """Forget an adapter (its model was deleted); one still decoding goes when its rows finish."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                return
            if entry.refs > 0:
                entry.doomed = True
            else:
                self._drop(adapter_id)

    def resident(self) -> list[str]:
        with self._lock:
            return list(self._entries)

    @property
    def used_bytes(self) -> int:
        """Memory held for adapters, free columns included."""
        return self.view.nbytes

    # -- engine thread ---------------------------------------------------------------------
    def prepare(self, adapters: Sequence[str | None]) -> None:
        """Point the adapted layers at the adapters of the rows about to run (None: the base)."""
        ctx = self.context
        view = self.view
        ctx.view = view  # the lean step also looks at what is resident when no row has an adapter
        distinct = set(adapters)
        if distinct == {None} or not distinct:
            ctx.span, ctx.mask = None, None
            return
        # A row whose adapter is gone was aborted after the engine last looked; it leaves the batch
        # before its output is read, so it just runs on the base for this one step.
        spans = [view.spans.get(a) if a is not None else None for a in adapters]
        if len(distinct) == 1:
            ctx.span, ctx.mask = spans[0], None
            return
        mask = torch.zeros((len(adapters), 1, view.width), dtype=view.dtype)
        rows_of: dict[tuple[int, int], list[int]] = {}
        for row, span in enumerate(spans):  # a packed prefill has a row per token: one write per adapter
            if span is not None:
                rows_of.setdefault(span, []).append(row)
        for (start, end), rows in rows_of.items():
            mask[rows, 0, start:end] = 1
        ctx.span, ctx.mask = None, mask

    # -- internals (bank lock held) -----------------------------------------------------------
    def _pin(self, adapter_id: str) -> bool:
        entry = self._entries.get(adapter_id)
        if entry is None or entry.doomed:
            return False
        entry.refs += 1
        self._entries.move_to_end(adapter_id)
        return True

    def _make_room(self, need: int) -> None:
        used = sum(e.nbytes for e in self._entries.values())
        for adapter_id in [a for a, e in self._entries.items() if e.refs == 0]:
            if used + need <= self.budget_bytes:
                break
            used -= self._entries[adapter_id].nbytes
            self._drop(adapter_id)
        if used + need > self.budget_bytes and self._entries:
            raise ServiceUnavailableError(
                "every resident adapter is busy and the adapter memory budget is full; retry shortly", retry_after=1.0
            )

    def _drop(self, adapter_id: str) -> None:
        del self._entries[adapter_id]
        view = self.view
        start, end = view.spans[adapter_id]
        self.view = BankView(
            {a: span for a, span in view.spans.items() if a != adapter_id},
            view.weights,
            view.width,
            {a: serial for a, serial in view.serials.items() if a != adapter_id},
        )
        for a_all, b_all in view.weights.values():  # free columns must be zero: masked rows read them
            a_all[start:end].zero_()
            b_all[:, start:end].zero_()

    def _wrap(self, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Put an ``AdaptedLinear`` around each target layer the first time an adapter needs it."""
        for name in modules:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            layer = getattr(parent, child)
            if isinstance(layer, nn.Linear):
                setattr(parent, child, AdaptedLinear(layer, name, self.context))


def _with_adapter(view: BankView, adapter: LoraWeights, serial: int) -> BankView:
    """``view`` plus ``adapter`` written into free columns. Columns no span owns are zero and only
    ever read under a zero mask, so writing them while the engine runs a step is safe; the tensors
    are reallocated (doubling) only when no gap is wide enough, so loads stay cheap and memory
    does not fragment."""
    rank = adapter.rank
    start = _free_columns(view, rank)
    weights = dict(view.weights)
    width = view.width
    if start is None:
        start, width = view.width, max(2 * view.width, view.width + rank)
        weights = {m: _widened(a, b, width) for m, (a, b) in weights.items()}
    for module, (a, b) in adapter.modules.items():
        if module not in weights:
            weights[module] = (torch.zeros((width, a.shape[1]), dtype=a.dtype), _zero_b(b.shape[0], width, b.dtype))
        a_all, b_all = weights[module]
        a_all[start : start + a.shape[0]] = a
        b_all[:, start : start + b.shape[1]] = b
    spans = {**view.spans, adapter.adapter_id: (start, start + rank)}
    return BankView(spans, weights, width, {**view.serials, adapter.adapter_id: serial})


def _free_columns(view: BankView, rank: int) -> int | None:
    """The first gap of ``rank`` columns no adapter owns, if any."""
    cursor = 0
    for start, end in sorted(view.spans.values()):
        if start - cursor >= rank:
            return cursor
        cursor = max(cursor, end)
    return cursor if view.width - cursor >= rank else None


def _widened(a: torch.Tensor, b: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    a_new = torch.zeros((width, a.shape[1]), dtype=a.dtype)
    b_new = _zero_b(b.shape[0], width, b.dtype)
    a_new[: a.shape[0]] = a
    b_new[:, : b.shape[1]] = b
    return a_new, b_new


def _zero_b(out: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """An (out, width) ``B_all`` stored column by column: each adapter's columns lie together
    (the decode kernel reads a row's own adapter's as one block, see lora_expand)."""
    return torch.zeros((width, out), dtype=dtype).T
