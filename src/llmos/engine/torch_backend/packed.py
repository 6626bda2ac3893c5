"""Weight matrices pre-packed for oneDNN, the library torch's CPU bf16 products run on.

``F.linear`` hands oneDNN a plain (out, in) matrix, and oneDNN reorders it into its blocked
layout on every call: for a decode step's few rows that reorder costs as much as the product
(on the 2-core reference CPU, SmolLM2's gate/up matrix for one row took 119 us through
``F.linear`` and 51 us pre-packed; a 16-row decode step went from 57 to 40 ms). Packing once,
with ``torch.ops.mkldnn._reorder_linear_weight``, and multiplying with ``_linear_pointwise``
gives the same result bit for bit (tested from 1 to 1,000 rows). The packed copy is an opaque
oneDNN tensor beside the original (which the model's own forward still reads), so it costs the
matrix's memory once more.
"""

from __future__ import annotations

import torch


class PackedMatrix:
    """``linear(x)`` = ``F.linear(x, weight)`` through a pre-packed copy of ``weight``."""

    def __init__(self, packed: torch.Tensor, nbytes: int) -> None:
        self.packed = packed
        self.nbytes = nbytes

    @classmethod
    def of(cls, weight: torch.Tensor) -> PackedMatrix | None:
        """A packed copy of a bf16 CPU matrix, or None where this torch build cannot pack it."""
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return None
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        except (RuntimeError, AttributeError):
            return None
        return cls(packed, weight.numel() * weight.element_size())

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
