"""Constrained decoding: grammars compiled once per (tokenizer, grammar), and each constrained
row's token mask applied inside the batched sampler (ADR 0012: llguidance).

A request's grammar is compiled when the API prepares it (``EngineClient.compile_grammar``),
so a grammar that is invalid or over the compile budget is refused before any work is queued;
the engine thread only copies the compiled matcher for each of the request's rows and asks it,
each step, which tokens may come next. Where a core is left beside torch's compute threads,
those masks are computed by llguidance's thread pool while the step's forward pass runs
(``MaskPrefetch``) and joined before the tokens are chosen; where torch's threads take every
core, on the engine thread itself when the tokens are chosen (``spare_cores``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf
import llguidance.torch
import torch

from llmos.engine.protocol import GrammarSpec
from llmos.engine.threads import compute_threads, enter_helper_thread
from llmos.errors import InvalidRequestError

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False}
"""Compact JSON: a small model left free to add whitespace may spend its tokens on it."""


def grammar_source(spec: GrammarSpec) -> str:
    """llguidance's grammar text for ``spec``: a Lark grammar with ``parts`` becomes a list of
    grammars, the Lark one first, each part under its name."""
    if spec.kind == "lark" and not spec.parts:
        return spec.source
    first = {"lark_grammar": spec.source} if spec.kind == "lark" else _one_grammar(spec)
    grammars = [{**first, "name": "start"}]
    grammars += [{**_one_grammar(part), "name": name} for name, part in spec.parts]
    return json.dumps({"grammars": grammars})


def _one_grammar(spec: GrammarSpec) -> dict[str, Any]:
    match spec.kind:
        case "json_schema":
            text = llguidance.LLMatcher.grammar_from_json_schema(spec.source, defaults=JSON_OPTIONS)
        case "regex":
            text = llguidance.LLMatcher.grammar_from_regex(spec.source)
        case "lark":
            if spec.parts:
                raise ValueError("a grammar part cannot have parts of its own")
            return {"lark_grammar": spec.source}
        case _:
            raise ValueError(f"unknown grammar kind {spec.kind!r}")
    (one,) = json.loads(text)["grammars"]
    return dict(one)


class RowMatcher:
    """Where one row stands in its grammar, and the mask of its next token once computed."""

    __slots__ = ("mask", "state", "vocab_size")

    def __init__(self, state: Any, vocab_size: int) -> None:
        self.state = state  # llguidance.LLMatcher
        self.vocab_size = vocab_size
        """Its tokenizer's vocabulary (the model's logits may be wider: padding ids)."""
        self.mask: torch.Tensor | None = None
        """The next token's mask (int32 words, a bit per token), None until computed after each token."""


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


_TO_SIGN_BIT = 31 - torch.arange(32, dtype=torch.int32)
"""Left shifts that bring bit ``i`` of a mask word (token ``32 * word + i``) to the sign bit."""
_NEG_INF_BITS = torch.tensor(float("-inf")).view(torch.int32)
_executor: Any = None  # llguidance.LLExecutor, made on first use
_prefetcher: ThreadPoolExecutor | None = None
_start_lock = threading.Lock()


def spare_cores() -> int:
    """Cores this process may use beyond its compute threads' torch threads. With none, a thread
    computing masks beside the forward pass can only take a core from torch's OpenMP team, whose
    every operator then waits for the descheduled worker, and a mask needed at once waits for that
    thread to be scheduled: the served steps grew far more than the masks cost (docs/performance.md)."""
    return len(os.sched_getaffinity(0)) - compute_threads()


def _shared() -> tuple[Any, ThreadPoolExecutor]:
    """llguidance's thread pool (Rust threads: no OpenMP team) on the spare cores, and the one
    Python thread that waits on it so that the engine thread need not (torch on one core there,
    engine.threads)."""
    global _executor, _prefetcher
    with _start_lock:
        if _executor is None or _prefetcher is None:
            _executor = llguidance.LLExecutor(num_threads=max(1, spare_cores()))
            _prefetcher = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks", initializer=enter_helper_thread)
        return _executor, _prefetcher


def fill_masks(matchers: Sequence[RowMatcher]) -> None:
    """Compute the next-token mask of each matcher that has none, a batch at a time: in
    llguidance's thread pool where a core is spare, else one by one on the calling thread (no
    hand-off to a thread that would take a core from torch's). Either computes without the GIL."""
    todo = [m for m in matchers if m.mask is None]
    executor = _shared()[0] if spare_cores() > 0 else None
    for vocab in {m.vocab_size for m in todo}:
        group = [m for m in todo if m.vocab_size == vocab]
        words = llguidance.torch.allocate_token_bitmask(len(group), vocab)
        if executor is not None:
            llguidance.torch.fill_next_token_bitmask_par(executor, [(m.state, i) for i, m in enumerate(group)], words)
        else:
            for i, m in enumerate(group):
                llguidance.torch.fill_next_token_bitmask(m.state, words, i)
        for i, m in enumerate(group):
            m.mask = words[i]


class MaskPrefetch:
    """The masks of a step's constrained rows, computed while the engine thread runs the step's
    forward pass where a core is spare (else nothing is started, and ``mask_logits`` computes
    them): ``start`` once the rows' tokens are chosen, ``wait`` before any matcher reads or takes
    a token (so a matcher is never used by two threads at once)."""

    def __init__(self) -> None:
        self._pending: Future[None] | None = None

    def start(self, matchers: Sequence[RowMatcher]) -> None:
        self.wait()
        todo = [m for m in matchers if m.mask is None and not m.state.is_stopped()]
        if todo and spare_cores() > 0:
            self._pending = _shared()[1].submit(fill_masks, todo)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result()
        except Exception:  # the masks left uncomputed are computed when needed, where a row fails alone
            log.exception("computing grammar masks ahead of the step failed")


def allowed_tokens(matchers: Sequence[RowMatcher], vocab: int) -> torch.Tensor:
    """(len(matchers), vocab) booleans: the tokens each matcher accepts next (ids past its
    tokenizer's vocabulary, padding rows of the model's embedding, never)."""
    logits = torch.zeros(len(matchers), vocab)
    mask_logits(logits, range(len(matchers)), matchers)
    return logits.isfinite()


def mask_logits(logits: torch.Tensor, rows: Sequence[int], matchers: Sequence[RowMatcher]) -> None:
    """Set to -inf, in place, every token the grammar of row ``rows[i]`` forbids (and ids past its
    tokenizer's vocabulary: padding rows of the embedding); the other rows are left as they are.
    Masks not prefetched are computed now. The rows get their masks as one addition of -inf or +0.0
    per token (``masked_fill_``, a copy of the rows, or llguidance's ``apply_token_bitmask_inplace``,
    which compiles itself with ``torch.compile`` at run time, cost more: docs/performance.md).
    Adding +0.0 leaves each allowed logit as it was (a -0.0 becomes +0.0, which no choice tells apart)."""
    fill_masks(matchers)
    masks = [m.mask for m in matchers if m.mask is not None]
    assert len(masks) == len(matchers)  # fill_masks gave every matcher one
    penalties = _penalties(torch.stack(masks))
    width = min(logits.shape[1], penalties.shape[1])
    index = torch.tensor(list(rows), dtype=torch.long)
    logits[:, :width].index_add_(0, index, penalties[:, :width])
    if logits.shape[1] > width:
        logits[index, width:] = float("-inf")


def _penalties(words: torch.Tensor) -> torch.Tensor:
    """(rows, 32 * words) float32 from packed masks (rows, words) int32: +0.0 where a token's bit
    is set, -inf where it is clear. Integer shifts only: each token's bit is moved to the sign bit
    and spread over its word by an arithmetic shift (all ones where set), and its complement keeps
    the bits of -inf where the token is forbidden."""
    set_bits = (words[:, :, None] << _TO_SIGN_BIT) >> 31
    return (~set_bits & _NEG_INF_BITS).view(torch.float32).reshape(words.shape[0], -1)


def advance(matcher: RowMatcher, token: int) -> bool:
    """Feed the chosen ``token`` to a row's matcher; True when the grammar is complete (the row
    ends). A token the grammar refuses raises (masks make that a bug, not a user error)."""
    matcher.mask = None
    if not matcher.state.consume_token(token):
        raise RuntimeError(f"the grammar refused token {token}: {matcher.state.get_error()}")
    return bool(matcher.state.is_stopped())
