"""Key/value caches that grow in place.

transformers' ``DynamicLayer`` appends each step's keys and values with ``torch.cat``, copying a
layer's whole cache every decode step, a large share of a many-row step that grows with the
cache (docs/performance.md, design measurements). ``GrowingLayer`` keeps the states in buffers
with spare room along the sequence and writes each step's new position in place, copying only
when the room runs out (then with half as much again to spare, but never past the ``limit``
its batch's rows may grow to, so the spare room stays within the key/value budget). A decode
step's attention reads the filled positions rounded up to its block (``attention.StepWindow``),
so a buffer keeps room for that block (its limit permitting), and the room past the filled
positions holds zeros or states a truncation forgot, never uninitialised memory: the masked
positions' values are multiplied by zero, which a NaN would survive. Everything
else (batch_state's merge, trim and split, the prefix cache) reads and assigns ``keys``/``values`` as before: an
assigned tensor becomes the buffer as it is, with no spare room, so a buffer that is shared with
anyone else is never written into.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llmos.engine.torch_backend.attention import WIDTH_BLOCK, block_width

MIN_SPARE = 32
assert MIN_SPARE >= WIDTH_BLOCK  # a buffer grown at ``end`` holds the block ``end`` ends in


class _Growing:
    """One of a layer's two tensors (keys or values): a buffer and how much of it is filled."""

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.length = 0
        self.limit: int | None = None
        """Positions the buffer never needs more than (its batch's longest reservation)."""

    def get(self) -> torch.Tensor | None:
        return None if self.buffer is None else self.buffer[:, :, : self.length]

    def set(self, tensor: torch.Tensor | None) -> None:
        self.buffer = tensor if tensor is not None and tensor.dim() == 4 else None
        self.length = 0 if self.buffer is None else self.buffer.shape[2]

    def append(self, states: torch.Tensor) -> None:
        end = self.length + states.shape[2]
        # Room for the block ``end`` ends in, except past the limit (attention then reads fewer).
        wanted = block_width(end) if self.limit is None else max(end, min(block_width(end), self.limit))
        if self.buffer is None or wanted > self.buffer.shape[2]:
            batch, heads, _, dim = states.shape
            size = end + max(MIN_SPARE, end // 2)
            if self.limit is not None:
                size = max(end, min(size, self.limit))
            grown = torch.empty((batch, heads, size, dim), dtype=states.dtype, device=states.device)
            if self.buffer is not None and self.length:
                grown[:, :, : self.length] = self.buffer[:, :, : self.length]
            grown[:, :, self.length :].zero_()
            self.buffer = grown
        self.buffer[:, :, self.length : end] = states
        self.length = end

    def read(self, width: int) -> torch.Tensor:
        """The buffer's first ``width`` positions, or all it holds where it holds fewer."""
        assert self.buffer is not None
        return self.buffer[:, :, :width]


class GrowingLayer(DynamicLayer):
    def __init__(self) -> None:
        self._keys, self._values = _Growing(), _Growing()
        super().__init__()

    @property
    def keys(self) -> torch.Tensor | None:
        return self._keys.get()

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._keys.set(tensor)

    @property
    def values(self) -> torch.Tensor | None:
        return self._values.get()

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._values.set(tensor)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True  # states assigned before the first update are kept

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.extend(key_states, value_states)
        return self.keys, self.values

    def extend(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """``update`` without handing the filled states back (a decode step ``read``s its window)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._keys.append(key_states)
        self._values.append(value_states)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows at ``indices`` (rows leaving a batch), spare room and all: transformers'
        selection of the filled positions alone left no room, so the next step copied the
        selected cache once more to grow it."""
        for states in (self._keys, self._values):
            if states.buffer is not None:
                states.buffer = states.buffer[indices]

    def read(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of the first ``width`` positions, or of as many as the buffers hold
        (their limit permitting no more; at least the filled ones). Positions past the filled
        ones hold zeros or states a truncation forgot, finite numbers for a masked product."""
        return self._keys.read(width), self._values.read(width)


def new_cache(config: Any) -> DynamicCache:
    """A cache for ``config``'s model whose full-attention layers grow in place (sliding-window
    layers keep transformers' own behaviour)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def limit_growth(cache: DynamicCache, positions: int) -> None:
    """Let no layer of ``cache`` keep room for more than ``positions`` positions."""
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            layer._keys.limit = layer._values.limit = positions


def grows_in_place(cache: DynamicCache) -> bool:
    """Whether every layer of ``cache`` grows in place (and so can be truncated)."""
    return all(isinstance(layer, GrowingLayer) for layer in cache.layers)


def truncate(cache: DynamicCache, length: int) -> bool:
    """Forget every position of ``cache`` from ``length`` on (what a failed pass wrote, drafts a
    verify rejected), in place; False where a layer is not one that grows in place (nothing is
    changed then)."""
    if not grows_in_place(cache):
        return False
    for layer in cache.layers:
        assert isinstance(layer, GrowingLayer)
        for states in (layer._keys, layer._values):
            if states.buffer is not None:
                states.length = min(states.length, length)
    return True


def cache_argument(model: Any) -> str:
    """The name under which ``model``'s forward takes its cache: ``cache`` since transformers 5.24
    renamed it (``past_key_values`` still works for now, with a warning, and goes in 5.40), the
    old name for architectures that were not renamed."""
    forward = getattr(type(model), "forward", None)
    try:
        names = inspect.signature(forward).parameters if forward is not None else {}
    except (TypeError, ValueError):
        names = {}
    return "cache" if "cache" in names else "past_key_values"
