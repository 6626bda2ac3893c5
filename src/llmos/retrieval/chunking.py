"""OpenAI's ``static`` chunking strategy: windows of at most ``max_chunk_size_tokens`` tokens,
consecutive windows sharing ``chunk_overlap_tokens``.

Tokens are counted as words and single punctuation marks (see ADR 0015): OpenAI counts its own
tokenizer's tokens, which this platform does not ship, and a word-level count keeps chunk
boundaries on word boundaries whatever the store's embedding model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llmos.errors import InvalidRequestError

MIN_CHUNK_TOKENS = 100
MAX_CHUNK_TOKENS = 4096
DEFAULT_CHUNK_TOKENS = 800
DEFAULT_OVERLAP_TOKENS = 400
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


@dataclass(frozen=True)
class StaticChunking:
    max_chunk_size_tokens: int = DEFAULT_CHUNK_TOKENS
    chunk_overlap_tokens: int = DEFAULT_OVERLAP_TOKENS

    def __post_init__(self) -> None:
        size, overlap = self.max_chunk_size_tokens, self.chunk_overlap_tokens
        if not MIN_CHUNK_TOKENS <= size <= MAX_CHUNK_TOKENS:
            raise InvalidRequestError(
                f"max_chunk_size_tokens must be between {MIN_CHUNK_TOKENS} and {MAX_CHUNK_TOKENS}",
                param="chunking_strategy.static.max_chunk_size_tokens",
            )
        if not 0 <= overlap <= size // 2:
            raise InvalidRequestError(
                "chunk_overlap_tokens must be between 0 and half of max_chunk_size_tokens",
                param="chunking_strategy.static.chunk_overlap_tokens",
            )

    @classmethod
    def parse(cls, value: Any) -> StaticChunking:
        """OpenAI's ``chunking_strategy`` body (``auto``, ``static`` or absent)."""
        if value is None:
            return cls()
        if not isinstance(value, dict) or value.get("type") not in ("auto", "static"):
            raise InvalidRequestError("chunking_strategy.type must be 'auto' or 'static'", param="chunking_strategy")
        if value["type"] == "auto":
            return cls()
        static = value.get("static")
        if not isinstance(static, dict):
            raise InvalidRequestError("chunking_strategy.static is required", param="chunking_strategy.static")
        size, overlap = static.get("max_chunk_size_tokens"), static.get("chunk_overlap_tokens")
        for name, number in (("max_chunk_size_tokens", size), ("chunk_overlap_tokens", overlap)):
            if not isinstance(number, int) or isinstance(number, bool):
                raise InvalidRequestError(f"{name} must be an integer", param=f"chunking_strategy.static.{name}")
        return cls(max_chunk_size_tokens=size, chunk_overlap_tokens=overlap)  # type: ignore[arg-type]

    def public(self) -> dict[str, Any]:
        return {
            "type": "static",
            "static": {
                "max_chunk_size_tokens": self.max_chunk_size_tokens,
                "chunk_overlap_tokens": self.chunk_overlap_tokens,
            },
        }

    def split(self, text: str) -> list[str]:
        """The chunks of ``text``: each the original text from its first token to its last."""
        spans = [m.span() for m in _TOKEN.finditer(text)]
        chunks: list[str] = []
        step = self.max_chunk_size_tokens - self.chunk_overlap_tokens
        start = 0
        while start < len(spans):
            window = spans[start : start + self.max_chunk_size_tokens]
            chunks.append(text[window[0][0] : window[-1][1]])
            if start + self.max_chunk_size_tokens >= len(spans):
                break
            start += step
        return chunks
