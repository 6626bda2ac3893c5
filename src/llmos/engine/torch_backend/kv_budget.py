"""Admission against the key/value cache budget of one decode batch.

The running batch keeps one key/value tensor per layer of (rows, heads, width, head_dim), where
the width is its longest row (left padding that no row needs is trimmed as rows leave). A row
can grow to its *reservation*: its prompt (and any virtual tokens) plus ``max_tokens``, at most
the context. So the cache never outgrows ``rows x longest reservation`` tokens, and a request is
admitted only while that bound stays within the budget; otherwise it waits for rows to finish,
and one that could never fit is refused before it is queued.
"""

from __future__ import annotations

from collections.abc import Iterable


class KvBudget:
    def __init__(self, budget_bytes: int, bytes_per_token: int) -> None:
        self.budget_bytes = budget_bytes
        self.bytes_per_token = max(1, bytes_per_token)

    @property
    def budget_tokens(self) -> int:
        return self.budget_bytes // self.bytes_per_token

    def fits(self, reservations: Iterable[int]) -> bool:
        """Whether rows with these reservations (in tokens) can share the batch within the budget."""
        rows = list(reservations)
        return not rows or len(rows) * max(rows) <= self.budget_tokens
