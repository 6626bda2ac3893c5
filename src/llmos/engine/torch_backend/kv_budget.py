"""Admission against the key/value cache budget of one decode batch.

The running batch keeps one key/value tensor per layer of (rows, heads, width, head_dim), where
the width is its longest row (left padding that no row needs is trimmed as rows leave). A row
can grow to its *reservation*: its prompt (and any virtual tokens) plus ``max_tokens``, at most
the context (the cache keeps no spare room beyond it: ``kv_cache.limit_growth``). Each row also
holds buffers of its own beside the cache (its next-token logits, the penalties' token counts,
the sampler's working copies), counted as ``row_overhead_bytes``. And while a layer's keys and
values are copied (the cache grows, rows join or leave, attention reads them contiguous) the old
and the new tensors both exist: one layer's share, ``1 / layers`` of the cache, more at that
moment. So a batch takes at most ``rows x (longest row + overhead) x (1 + 1 / layers)``. The
runner admits a request while that bound, over what every held row takes now (and a little room
to grow), stays within the budget; otherwise it waits for rows to finish, and one that could
never fit even alone (at its reservation) is refused before it is queued. Rows that outgrow the
budget later are preempted (``preemption``), and no buffer grows ahead past ``widest``.

Beside the budget a burst takes the freed memory the heaps keep (up to ``heap_slack_mb``,
``engine.heap``), oneDNN's capped primitive caches (``engine.process``) and one prefill pass's
activations (docs/performance.md, Decode-batch memory, states the sum).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


class KvBudget:
    def __init__(self, budget_bytes: int, bytes_per_token: int, row_overhead_bytes: int = 0, layers: int = 0) -> None:
        self.budget_bytes = budget_bytes
        self.bytes_per_token = max(1, bytes_per_token)
        self.row_overhead_tokens = -(-row_overhead_bytes // self.bytes_per_token)  # rounded up
        self.copy_share = 1 / layers if layers else 0.0

    @property
    def budget_tokens(self) -> int:
        return self.budget_bytes // self.bytes_per_token

    def fits(self, reservations: Iterable[int]) -> bool:
        """Whether rows with these reservations (in tokens) can share the batch within the budget."""
        rows = list(reservations)
        return self.tokens_for(rows) <= self.budget_tokens

    def tokens_for(self, reservations: Iterable[int]) -> float:
        """The budget, in cache tokens, that rows with these reservations take together."""
        rows = list(reservations)
        if not rows:
            return 0.0
        return len(rows) * (max(rows) + self.row_overhead_tokens) * (1 + self.copy_share)

    def widest(self, rows: int) -> int:
        """The most positions ``rows`` rows may each hold within the budget (how far a batch's
        buffers may grow ahead)."""
        return int(self.budget_tokens / ((1 + self.copy_share) * max(1, rows))) - self.row_overhead_tokens

    def bytes_for(self, reservations: Iterable[int]) -> int:
        """The smallest budget in bytes that holds rows with these reservations."""
        return math.ceil(self.tokens_for(reservations)) * self.bytes_per_token
