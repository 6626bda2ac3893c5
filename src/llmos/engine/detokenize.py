"""Incremental detokenisation with stop sequences, one instance per generated sequence.

Text is released only when it is final: an incomplete UTF-8 character, or a tail that may
still grow into a stop sequence, is held back until the next token decides it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[Sequence[int]], str]


class IncrementalText:
    def __init__(self, decode: Decode, stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self._emitted = 0
        self.stopped = False

    @property
    def token_ids(self) -> list[int]:
        return self._ids

    def push(self, token_id: int) -> str:
        """Add a token; return the newly final text (possibly empty). Sets ``stopped`` on a stop hit."""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        if self._stop:
            window_start = max(0, self._emitted - max(len(s) for s in self._stop))
            hits = [i for s in self._stop if (i := text.find(s, window_start)) != -1]
            if hits:
                self.stopped = True
                return self._release(text[: min(hits)])
        final_end = len(text)
        if text.endswith("\ufffd"):
            final_end = len(text.rstrip("\ufffd"))
        final_end = min(final_end, len(text) - self._pending_stop_prefix(text))
        return self._release(text[:final_end])

    def flush(self) -> str:
        """Release whatever is held back (at the end of generation)."""
        if self.stopped:
            return ""
        return self._release(self._decode(self._ids))

    def _release(self, text: str) -> str:
        if len(text) <= self._emitted:
            return ""
        new = text[self._emitted :]
        self._emitted = len(text)
        return new

    def _pending_stop_prefix(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of a stop sequence."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
