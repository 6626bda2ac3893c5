"""A decode step's ``B`` products for mixed-adapter batches, by the native kernel (Punica's
"expand": each row reads only its own adapter's ``B``).

The torch path masks every row's ``A`` outputs to its adapter's columns and multiplies by a
block-diagonal matrix of every adapter's ``B`` (two oneDNN calls a group, zeros included in what
is read), and the step is memory-bound, so most of what adapters add to it is that reading.
``native/lora_expand.c`` adds each row's own adapter into the fused product's base columns in
place, in one call a group that reads each used adapter's ``B`` once, which takes back about
half of that cost (docs/performance.md, design measurements).

It runs on decode steps whose base products are fused (the ``A`` outputs come with them); a
packed prefill (hundreds of rows) is arithmetic, where oneDNN's AMX products win.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from llmos.engine.torch_backend import native
from llmos.engine.torch_backend.lora_bank import BankView

MAX_ROWS = 64
"""Decode batches up to this many rows use the kernel (larger ones are arithmetic)."""

_ENTRY = {torch.bfloat16: "lora_expand_bf16", torch.float32: "lora_expand_f32"}
_ARGS = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int64] + [ctypes.c_void_p] * 6


@dataclass(frozen=True)
class _Call:
    """One group's constant arguments over one bank view: per part, where its ``A`` outputs
    start in the fused product, its base output columns and its ``B`` (transposed)."""

    parts: int
    addresses: tuple[int, int, int, int]  # hoff, ostart, owidth, bt pointers (arrays below)
    keep: tuple[object, ...]  # the arrays and tensors the addresses point into


class LoraExpand:
    """``add(full, layer, group)``: the prepared rows' adapters added to a fused product."""

    def __init__(self, library: ctypes.CDLL, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._entry = getattr(library, _ENTRY[dtype])
        self._entry.restype = None
        self._entry.argtypes = _ARGS
        self._view: BankView | None = None
        self._calls: dict[tuple[int, str], _Call | None] = {}
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def load(cls, dtype: torch.dtype) -> LoraExpand | None:
        """The kernel for ``dtype`` products, or None where it is not built (or not for it)."""
        if dtype not in _ENTRY:
            return None
        library = native.load("lora_expand")
        return None if library is None else cls(library, dtype)

    def prepare(self, view: BankView, mask: torch.Tensor, rows: int) -> None:
        """Each row's columns from its (rows, width) mask, or (1, width) when every row has the
        same (an adapter's columns are one range)."""
        if view is not self._view:
            self._view, self._calls = view, {}
        used = (mask != 0).expand(rows, -1)
        count = used.sum(1, dtype=torch.int32)
        first = used.to(torch.uint8).argmax(1).to(torch.int32)
        self._rows = (first.contiguous(), count.contiguous())

    def add(self, full: torch.Tensor, out: int, layout: list[tuple[str, int]], layer: int, group: str) -> bool:
        """Add the rows' adapters to the base columns of ``full`` (rows, out + parts * width) in
        place; False if the group has no adapted module."""
        assert self._view is not None and self._rows is not None, "prepare first"
        key = (layer, group)
        if key in self._calls:
            call = self._calls[key]
        else:
            call = self._calls[key] = _call(self._view, out, layout)
        if call is None:
            return False
        rows = full.shape[0]
        first, count = self._rows
        assert full.dtype == self.dtype and full.is_contiguous() and rows == first.shape[0]
        hoff, ostart, owidth, bt = call.addresses
        data, width = full.data_ptr(), full.stride(0)
        self._entry(rows, call.parts, data, width, hoff, ostart, owidth, bt, first.data_ptr(), count.data_ptr())
        return True


def _call(view: BankView, out: int, layout: list[tuple[str, int]]) -> _Call | None:
    offsets: list[int] = []
    starts: list[int] = []
    widths: list[int] = []
    matrices: list[torch.Tensor] = []
    start = 0
    for name, width in layout:
        ab = view.weights.get(name)
        if ab is not None:
            assert ab[1].dtype == view.dtype, "one dtype for the bank's matrices"
            # The bank stores B column by column, so B.T is (columns, out) as it lies in memory.
            bt = ab[1].T.contiguous()
            offsets.append(out + len(matrices) * view.width)
            starts.append(start)
            widths.append(width)
            matrices.append(bt)
        start += width
    if not matrices:
        return None
    hoff, ostart, owidth = ((ctypes.c_int64 * len(values))(*values) for values in (offsets, starts, widths))
    pointers = (ctypes.c_void_p * len(matrices))(*[m.data_ptr() for m in matrices])
    addresses = (ctypes.addressof(hoff), ctypes.addressof(ostart), ctypes.addressof(owidth), ctypes.addressof(pointers))
    return _Call(len(matrices), addresses, (hoff, ostart, owidth, pointers, *matrices))
