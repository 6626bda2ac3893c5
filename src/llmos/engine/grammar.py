"""Constrained decoding: grammars compiled once per (tokenizer, grammar), and each constrained
row's token mask applied inside the batched sampler (ADR 0012: llguidance).

A request's grammar is compiled when the API prepares it (``EngineClient.compile_grammar``),
so a grammar that is invalid or over the compile budget is refused before any work is queued;
the engine thread only copies the compiled matcher for each of the request's rows and asks it,
each step, which tokens may come next.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from llmos.engine.protocol import GrammarSpec
from llmos.errors import InvalidRequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
"""Compact JSON: a small model left free to add whitespace may spend its tokens on it."""


def grammar_source(spec: GrammarSpec) -> str:
    """llguidance's grammar text for ``spec``."""
    match spec.kind:
        case "json_schema":
            return str(llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS))
        case "regex":
            return str(llguidance.LLMatcher.grammar_from_regex(spec.source))
        case "lark":
            return spec.source
    raise ValueError(f"unknown grammar kind {spec.kind!r}")


@dataclass(frozen=True)
class RowMatcher:
    """Where one row stands in its grammar."""

    state: Any  # llguidance.LLMatcher
    vocab_size: int
    """Its tokenizer's vocabulary (the model's logits may be wider: padding ids)."""


@dataclass(frozen=True)
class CompiledGrammar:
    """A grammar compiled for one tokenizer: every row that follows it starts from a copy."""

    spec: GrammarSpec
    prototype: Any  # llguidance.LLMatcher in its initial state, never advanced itself
    vocab_size: int

    def matcher(self) -> RowMatcher:
        return RowMatcher(self.prototype.deep_copy(), self.vocab_size)


class GrammarCompiler:
    """Compiles grammars for one tokenizer, keeping the last ``capacity`` compiled (thread-safe)."""

    def __init__(self, tokenizer: Any, *, budget: int, capacity: int) -> None:
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer)
        self.vocab_size = int(self._tokenizer.vocab_size)
        # The compile budget bounds the lexer's construction work and the grammar's size, so a
        # schema that would take long to compile is refused instead of stalling the server.
        self._limits = llguidance.LLParserLimits(initial_lexer_fuel=budget, max_grammar_size=budget // 2)
        self._capacity = capacity
        self._compiled: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0

    def compile(self, spec: GrammarSpec, *, param: str) -> CompiledGrammar:
        """``spec`` compiled (from the cache when it was compiled before); raises
        InvalidRequestError naming ``param`` when it is invalid or over the compile budget."""
        with self._lock:
            hit = self._compiled.get(spec)
            if hit is not None:
                self._compiled.move_to_end(spec)
                return hit
        try:
            source = grammar_source(spec)
        except ValueError as exc:
            raise InvalidRequestError(f"invalid {param}: {exc}", param=param) from exc
        matcher = llguidance.LLMatcher(self._tokenizer, source, log_level=0, limits=self._limits)
        if matcher.is_error():
            raise InvalidRequestError(f"invalid {param}: {matcher.get_error()}", param=param)
        compiled = CompiledGrammar(spec, matcher, self.vocab_size)
        with self._lock:
            self.compiles += 1
            self._compiled[spec] = compiled
            while len(self._compiled) > self._capacity:
                self._compiled.popitem(last=False)
        return compiled


_BITS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(matchers: Sequence[RowMatcher], vocab: int) -> torch.Tensor:
    """(len(matchers), vocab) booleans: the tokens each matcher accepts next (ids past its
    tokenizer's vocabulary, padding rows of the model's embedding, never)."""
    allowed = torch.zeros(len(matchers), vocab, dtype=torch.bool)
    for row, matcher in enumerate(matchers):
        words = llguidance.torch.allocate_token_bitmask(1, matcher.vocab_size)
        llguidance.torch.fill_next_token_bitmask(matcher.state, words, 0)
        bits = ((words[0, :, None] >> _BITS) & 1).reshape(-1).bool()
        width = min(vocab, matcher.vocab_size)
        allowed[row, :width] = bits[:width]
    return allowed


def mask_logits(logits: torch.Tensor, rows: Sequence[int], matchers: Sequence[RowMatcher]) -> torch.Tensor:
    """``logits`` (B, V) with every token the grammar of row ``rows[i]`` forbids set to -inf
    (a copy; the other rows unchanged)."""
    masked = logits.clone()
    index = torch.tensor(list(rows), dtype=torch.long)
    allowed = allowed_tokens(matchers, logits.shape[1])
    masked[index] = masked[index].masked_fill(~allowed, float("-inf"))
    return masked


def advance(matcher: RowMatcher, token: int) -> bool:
    """Feed the chosen ``token`` to a row's matcher; True when the grammar is complete (the row
    ends). A token the grammar refuses raises (masks make that a bug, not a user error)."""
    if not matcher.state.consume_token(token):
        raise RuntimeError(f"the grammar refused token {token}: {matcher.state.get_error()}")
    return bool(matcher.state.is_stopped())
