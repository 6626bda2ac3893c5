"""Weight matrices pre-packed for oneDNN, one of the libraries torch's CPU products run on.

bf16: ``F.linear`` hands oneDNN a plain (out, in) matrix, and oneDNN reorders it into its blocked
layout on every call: for a decode step's few rows that reorder costs as much as the product
(pre-packed, one row's product takes less than half the time, and a whole decode step about a
third less; docs/performance.md, design measurements). Packing once,
with ``torch.ops.mkldnn._reorder_linear_weight``, and multiplying with ``_linear_pointwise``
gives the same result bit for bit (tested from 1 to 1,000 rows).

float32: ``F.linear`` runs MKL's sgemm, which for two or more rows packs the matrix on every call
as oneDNN's bf16 path did; oneDNN's pre-packed float32 product skips that (docs/performance.md).
It sums in another order than MKL (results within float32 rounding of ``F.linear``, not equal),
and gives each row the same result whatever the rows beside it, which ``F.linear`` does not (one
row runs MKL's matrix-vector kernel): a speculative verify's rows are then the decode steps'.

The packed copy is an opaque oneDNN tensor beside the original (which the model's own forward
still reads), so it costs the matrix's memory once more.

One row against several: on some CPUs oneDNN multiplies a single row with another kernel, which
sums in another order, so a row decoded alone gets other bits than the same row in a batch or in a
speculative verify (a 2-core AMD EPYC with AVX-512 BF16, for products over 1,536 inputs;
docs/adr/0027, seventh addendum). ``Matrix.one_row_differs`` finds such a matrix, and a ``Matrix`` whose
``pad_one_row`` is set multiplies a lone row as the first of two, with a zero row below it: every
row then gets the bits of its multi-row product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_DTYPES = (torch.bfloat16, torch.float32)
ROW_CHECK_VALUES = 2**18
"""Output values ``Matrix.one_row_differs`` compares (a bf16 output hides most differences in a
sum's last bits, so a narrow matrix needs more rows than a wide one to show one), in 4 to
``ROW_CHECK_MAX_ROWS`` rows."""
ROW_CHECK_MAX_ROWS = 256

_lone_rows_differ: dict[tuple[int, int, torch.dtype, bool, int], bool] = {}
"""``Matrix.one_row_differs`` by (outputs, inputs, dtype, packed, threads)."""


class PackedMatrix:
    """``linear(x)`` = ``F.linear(x, weight)`` through a pre-packed copy of ``weight``."""

    def __init__(self, packed: torch.Tensor, nbytes: int) -> None:
        self.packed = packed
        self.nbytes = nbytes

    @classmethod
    def of(cls, weight: torch.Tensor) -> PackedMatrix | None:
        """A packed copy of a bf16 or float32 CPU matrix, or None where this torch build cannot pack it."""
        if weight.dtype not in PACKED_DTYPES or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return None
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        except (RuntimeError, AttributeError):
            return None
        return cls(packed, weight.numel() * weight.element_size())

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        # The bias goes into the product, as ``F.linear`` adds it: added after, bf16 rounds twice.
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class Matrix:
    """Products with ``[weight; extra]``: a base matrix and, appended as further output columns,
    extra rows (adapters' ``A``; see fused_weights), through a packed copy where this build packs
    (else the concatenation as it is, a copy only when extended); ``bias``: the base matrix's
    (the extra columns get none)."""

    def __init__(
        self, weight: torch.Tensor, extra: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> None:
        self.out, self.inputs = weight.shape
        full = weight if extra is None else torch.cat([weight, extra.to(weight.dtype)])
        self.packed = PackedMatrix.of(full)
        self.plain = full if self.packed is None else None
        self.extra_rows = 0 if extra is None else extra.shape[0]
        self.bias = None if bias is None else F.pad(bias.detach().to(weight.dtype), (0, self.extra_rows))
        self.nbytes = full.numel() * full.element_size() if (self.packed is not None or extra is not None) else 0
        self.dtype = weight.dtype
        self.pad_one_row = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ [weight; extra].T + [bias; 0]``."""
        if self.pad_one_row and x.numel() == self.inputs:
            two = F.pad(x.reshape(1, self.inputs), (0, 0, 0, 1))
            return self._product(two)[:1].view(*x.shape[:-1], -1)
        return self._product(x)

    def one_row_differs(self) -> bool:
        """Whether this matrix's product of one row gives some row other bits than its product of
        several rows does (random rows, each multiplied alone and compared with its place in one
        product of all). Run it on a thread with the engine's thread count: oneDNN may choose its
        kernels by it, as by the shape and dtype, so the answer is kept per all three."""
        width = self.out + self.extra_rows
        key = (width, self.inputs, self.dtype, self.packed is not None, torch.get_num_threads())
        if key not in _lone_rows_differ:
            rows = min(ROW_CHECK_MAX_ROWS, max(4, -(-ROW_CHECK_VALUES // width)))
            generator = torch.Generator().manual_seed(0)
            x = torch.randn(rows, self.inputs, generator=generator).to(self.dtype)
            together = self._product(x)
            _lone_rows_differ[key] = any(
                not torch.equal(self._product(x[i : i + 1]), together[i : i + 1]) for i in range(rows)
            )
        return _lone_rows_differ[key]

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.linear(x, self.bias)
        assert self.plain is not None
        return F.linear(x, self.plain, self.bias)

    def added_to(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``y + x @ weight.T`` for 2-d ``x`` and ``y`` (a new tensor), in one oneDNN call where packed."""
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, y, self.packed.packed, None, "add")
        assert self.plain is not None
        return torch.addmm(y, x, self.plain.T)
