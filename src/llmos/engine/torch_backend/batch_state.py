"""Tensor bookkeeping of a running decode batch: rows join (merge), leave (select) and the
left padding that nobody needs any more is trimmed.

Every row keeps explicit position ids, so left padding never changes what a row computes:
padded key/value columns are masked out, and trimming all-padding columns is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from llmos.engine.sampling import BatchSampling, concat_counts
from llmos.engine.torch_backend.kv_cache import new_cache

RowT = TypeVar("RowT")


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer key/value holders (full-attention layers: ``keys``/``values`` of (B, H, L, D))."""
    return list(cache.layers)


@dataclass
class BatchState(Generic[RowT]):
    rows: list[RowT]
    cache: DynamicCache
    attention: torch.Tensor  # (B, L) 1 where a key/value column holds a real token
    next_pos: torch.Tensor  # (B,) position of the token each row produces next
    logits: torch.Tensor  # (B, V) float32, for the token each row produces next
    sampling: BatchSampling
    counts: torch.Tensor | None  # (B, V) tokens generated so far, when penalties are used

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, keep: list[int]) -> None:
        """Keep only the rows at ``keep`` (in order), then trim padding no row needs."""
        if len(keep) == len(self.rows):
            return
        idx = torch.tensor(keep, dtype=torch.long)
        self.cache.batch_select_indices(idx)
        self.rows = [self.rows[i] for i in keep]
        self.attention, self.next_pos, self.logits = self.attention[idx], self.next_pos[idx], self.logits[idx]
        self.sampling = self.sampling.select(idx)
        self.counts = self.counts[idx] if self.counts is not None else None
        self.trim()

    def split_off(self, indices: list[int], config: Any) -> BatchState[RowT]:
        """Remove the rows at ``indices`` (in order) and return them as a batch of their own."""
        idx = torch.tensor(indices, dtype=torch.long)
        cache = new_cache(config)
        for i, layer in enumerate(_layers(self.cache)):
            cache.update(layer.keys[idx], layer.values[idx], i)
        other = BatchState(
            rows=[self.rows[i] for i in indices],
            cache=cache,
            attention=self.attention[idx],
            next_pos=self.next_pos[idx],
            logits=self.logits[idx],
            sampling=self.sampling.select(idx),
            counts=self.counts[idx] if self.counts is not None else None,
        )
        other.trim()
        gone = set(indices)
        self.select([i for i in range(len(self.rows)) if i not in gone])
        return other

    def trim(self) -> None:
        used = self.attention.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start == 0:
            return
        self.attention = self.attention[:, start:]
        for layer in _layers(self.cache):
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]

    def merge(self, other: BatchState[RowT]) -> None:
        """Append ``other``'s rows (freshly prefilled) to this running batch."""
        width = max(self.attention.shape[1], other.attention.shape[1])
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, 2), _pad_left(theirs.keys, width, 2)])
            mine.values = torch.cat([_pad_left(mine.values, width, 2), _pad_left(theirs.values, width, 2)])
        self.attention = torch.cat([_pad_left(self.attention, width, 1), _pad_left(other.attention, width, 1)])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.logits = torch.cat([self.logits, other.logits])
        self.sampling = self.sampling.concat(other.sampling)
        self.counts = concat_counts(self.counts, len(self.rows), other.counts, len(other.rows), self.logits.shape[1])
        self.rows = self.rows + other.rows


def forward_kwargs(state: BatchState[Any], tokens: torch.Tensor, cache_name: str = "cache") -> dict[str, Any]:
    """Inputs of one decode step: each row's new token at its own position (the cache under the
    name the model's forward takes it by, see ``kv_cache.cache_argument``)."""
    return {
        "input_ids": tokens[:, None],
        "attention_mask": state.attention,
        "position_ids": state.next_pos[:, None],
        cache_name: state.cache,
        "use_cache": True,
    }
