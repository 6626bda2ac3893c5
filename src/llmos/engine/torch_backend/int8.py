"""Int8 copies of a model's weight matrices for decoding single rows.

Decoding one row is bound by reading the weights, not by arithmetic: every step reads each
matrix once whatever the number of rows. Reading an int8 copy (one scale per output row,
symmetric) halves that traffic, and torch's ``_weight_int8pack_mm`` kernel runs it at the
memory's speed. Against plain ``F.linear`` it was more than twice as fast up to four rows, but
most of that gap was oneDNN reordering the bf16 weight on every call; against the pre-packed
bf16 copies the lean step now reads (see ``packed``) int8 is still slightly ahead for one row
and behind from two (docs/performance.md, design measurements). ``INT8_MAX_ROWS`` is that
crossover.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT8_MAX_ROWS = 1


class Int8Matrix:
    """``weight`` (out, in) quantised per output row; ``linear`` picks int8 or the original by rows."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        self.scales = scales.to(weight.dtype)
        self.weight = weight
        self.bias = bias
        self.nbytes = self.q.numel() + self.scales.numel() * self.scales.element_size()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > INT8_MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        flat = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, x.shape[-1]), self.q, self.scales)
        out = flat.view(*x.shape[:-1], self.q.shape[0])
        return out if self.bias is None else out + self.bias


def int8_supported(dtype: torch.dtype) -> bool:
    """Whether this torch build has the int8 weight kernel for activations of ``dtype``."""
    if dtype != torch.bfloat16:
        return False
    try:
        torch.ops.aten._weight_int8pack_mm(
            torch.zeros((1, 8), dtype=dtype), torch.zeros((8, 8), dtype=torch.int8), torch.ones(8, dtype=dtype)
        )
    except (RuntimeError, AttributeError):
        return False
    return True
