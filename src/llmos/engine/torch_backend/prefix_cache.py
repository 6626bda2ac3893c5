"""Key/value states of prompt prefixes, kept so a shared system prompt is prefilled once.

Prefixes are cut in blocks of ``BLOCK`` tokens and keyed by a chained hash of their tokens, as in
vLLM's automatic prefix caching, plus the tenant and the adapter: one tenant never reuses (and
so cannot time) another tenant's prompts, and an adapter's states are not a base model's. Only
full-attention caches are stored (a sliding-window layer's states depend on more than the
prefix). Entries are evicted least recently used under a byte budget.

An entry stored by a request that scored its prompt also keeps those scores (a few numbers per
token), so scoring several continuations of one context (a multiple-choice question) computes
the context once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llmos.engine.torch_backend.prompt_scores import PromptScores

BLOCK = 16


@dataclass
class _Entry:
    states: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values of (1, H, L, D)
    nbytes: int
    keys: list[bytes]  # the block keys that point here
    scores: PromptScores | None = None  # its tokens' scores after the first, when it was scored

    def scored(self, k: int) -> bool:
        return self.scores is not None and self.scores.k >= k


class PrefixCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # by the key of its full length, LRU first
        self._index: dict[bytes, bytes] = {}  # any block key -> the entry holding states that long
        self._used = 0
        self.hits = 0
        self.tokens_reused = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def lookup(
        self, scope: str, prompt: Sequence[int], *, lead: int = 0
    ) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]] | None:
        """The longest cached prefix of ``prompt`` (leaving at least one token to compute) as
        (length, per-layer states sliced to it), or None. ``lead`` cache positions come before
        the prompt (an adapter's virtual tokens) and are part of the states returned."""
        best = self._longest(scope, prompt, lambda entry: True)
        if best is None:
            return None
        length, owner = best
        return length, self._take(owner, lead + length)

    def lookup_scored(
        self, scope: str, prompt: Sequence[int], k: int, *, lead: int = 0
    ) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]], PromptScores] | None:
        """For a request scoring its prompt with ``k`` alternatives: the longest cached prefix
        whose scores were kept, as (start, states, scores) where ``start`` is one token short of
        the prefix (the logits of its last position, which score the next token, are computed
        again) and ``scores`` cover the prompt's tokens up to ``start``."""
        best = self._longest(scope, prompt, lambda entry: entry.scored(k))
        if best is None:
            return None
        length, owner = best
        scores = self._entries[owner].scores
        assert scores is not None
        return length - 1, self._take(owner, lead + length - 1), scores.first(length - 1, k)

    def _longest(self, scope: str, prompt: Sequence[int], usable: Callable[[_Entry], bool]) -> tuple[int, bytes] | None:
        best: tuple[int, bytes] | None = None
        for length, key in _block_keys(scope, prompt, limit=len(prompt) - 1):
            owner = self._index.get(key)
            # A shorter block may have left with an evicted entry: keep looking.
            if owner is not None and usable(self._entries[owner]):
                best = (length, owner)
        if best is not None:
            self.hits += 1
            self.tokens_reused += best[0]
        return best

    def _take(self, owner: bytes, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self._entries.move_to_end(owner)
        return [(k[:, :, :end], v[:, :, :end]) for k, v in self._entries[owner].states]

    def store(
        self,
        scope: str,
        prompt: Sequence[int],
        cache: DynamicCache,
        row: int,
        *,
        lead: int = 0,
        scores: PromptScores | None = None,
    ) -> None:
        """Keep the states of ``prompt``'s full blocks from row ``row`` of a fresh prefill cache,
        which must hold that prompt alone, without padding, after ``lead`` positions that the
        scope always has (an adapter's virtual tokens); with ``scores``, the prompt's scores too
        (an entry without them is replaced)."""
        layers: list[Any] = list(cache.layers)
        full_attention = all(isinstance(layer, DynamicLayer) and not layer.is_sliding for layer in layers)
        if self.budget_bytes <= 0 or not layers or not full_attention:
            return
        keys = _block_keys(scope, prompt, limit=len(prompt))
        if not keys:
            return
        length, owner = keys[-1]
        held = self._index.get(owner)
        if held is not None and (scores is None or self._entries[held].scored(scores.k)):
            return
        if owner in self._entries:  # the same prefix, unscored: replaced by the scored one
            self._drop(owner)
        kept = scores.first(length - 1) if scores is not None else None
        states = [
            (
                layer.keys[row : row + 1, :, : lead + length].clone(),
                layer.values[row : row + 1, :, : lead + length].clone(),
            )
            for layer in layers
        ]
        nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in states) + (kept.nbytes if kept else 0)
        if nbytes > self.budget_bytes:
            return
        while self._used + nbytes > self.budget_bytes:
            self._evict_oldest()
        covered = [key for _, key in keys]  # this entry covers every shorter prefix too
        self._entries[owner] = _Entry(states, nbytes, covered, kept)
        self._index.update(dict.fromkeys(covered, owner))
        self._used += nbytes

    def _evict_oldest(self) -> None:
        self._drop(next(iter(self._entries)))

    def _drop(self, owner: bytes) -> None:
        entry = self._entries.pop(owner)
        for key in entry.keys:
            if self._index.get(key) == owner:
                del self._index[key]
        self._used -= entry.nbytes

    def clear(self) -> None:
        self._entries.clear()
        self._index.clear()
        self._used = 0


def _block_keys(scope: str, prompt: Sequence[int], *, limit: int) -> list[tuple[int, bytes]]:
    """(prefix length, key) for every full block boundary at or below ``limit`` tokens."""
    digest = hashlib.blake2b(scope.encode(), digest_size=16)
    out = []
    for end in range(BLOCK, limit + 1, BLOCK):
        digest.update(b"".join(t.to_bytes(4, "little", signed=False) for t in prompt[end - BLOCK : end]))
        out.append((end, digest.copy().digest()))
    return out
