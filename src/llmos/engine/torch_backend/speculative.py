"""Speculative decoding of a single stream: drafts by prompt lookup, verified in one pass.

A decode step of one row reads every weight to compute one token; a pass over a few tokens
reads them once too, and costs little more (docs/adr/0027). When a chat model's batch holds a
single decoding row and no prompt is waiting, the row's next tokens are *drafted* from the
latest earlier occurrence of its last few tokens in its prompt and output (prompt lookup, as
transformers' ``prompt_lookup_num_tokens`` and vLLM's ``ngram`` method do: answers that copy
their input, summaries, code edits, quotes; and in the request's prediction, OpenAI's Predicted
Outputs, when it has one), and the token just chosen and the draft are
*verified* in one pass over the row's cache with every position's logits (the lean layers'
``LeanDecoder.verify``, each position computed as a decode step computes it, where the model has
them; else its own forward).
Each draft token is accepted by the standard speculative-sampling rule, so the output is what
decoding one token at a time produces: greedy rows accept a draft token exactly when it is the
argmax; sampled rows accept draft token ``x`` with probability ``p(x)`` of the row's own
distribution (temperature, top-p) and otherwise draw from ``p`` with ``x`` removed, which
leaves every token's probability ``p`` (a point-mass draft). The first rejected position (or,
when all are accepted, the position after the draft) gives one more token from the same pass.
The accepted tokens go through the row's streaming one by one (stop sequences, ``max_tokens``,
the end token), and the cache is rolled back to what was accepted.

Rows whose next token is not a plain draw from their distribution keep decoding one token at a
time: grammar-constrained rows (the mask depends on each accepted token), rows with presence or
frequency penalties (the counts change with each token), rows that report logprobs, and seeded
sampled rows, whose tokens come from their own generator one draw a token, so that a seed gives
the same output whether or not its request ran alone. So do rows whose cache cannot be rolled
back (sliding-window layers), and a LoRA adapter's rows, whose adapter products the verify rounds
differently. ``auto`` speculates only on models with the lean layers, whose verify reproduces the
decode step bit for bit where a probe at load finds that it does on this CPU
(``verify_matches_steps``); ``ngram`` also verifies through other models' forward (equal to the
step only up to rounding).

Where prompt lookup finds nothing worth verifying and the model has a draft model
(``draft_models``: a smaller model of its family, ``draft_model``), that model proposes the
tokens instead, by its own decode steps (greedy for a greedy row; for a sampled row, drawn from
its own distribution at the row's temperature and top-p, which the rule above then divides by:
``min(1, p(x) / q(x))``, a token accepted with probability ``sum min(p, q)``); its
drafts keep an acceptance rate of their own, and a draft token's cost (its weight bytes over the
target's) joins the verify's in the rule below.

``auto`` speculates only where it pays: a verify of ``m`` drafts costs ``VERIFY_BASE_COST +
VERIFY_COST_PER_DRAFT * m`` decode steps and yields one token plus the accepted ones, so a row
drafts the length that maximises its expected tokens per unit of cost, from its own recent
acceptance rate, and only while that beats a plain step; a row refused waits a doubling number
of drafting steps before one probing verify.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmos.engine import threads
from llmos.engine.choices import Streamer
from llmos.engine.config import EngineConfig
from llmos.engine.sampling import draw_one, sampling_probs
from llmos.engine.scheduler import Row
from llmos.engine.torch_backend.batch_state import BatchState
from llmos.engine.torch_backend.draft_model import DraftModel
from llmos.engine.torch_backend.kv_cache import grows_in_place, new_cache, truncate

log = logging.getLogger(__name__)
MODES = ("auto", "ngram", "off")
LONGEST_MATCH = 4
"""Suffix lengths looked up, longest first: a longer match predicts its continuation better."""
SHORTEST_MATCH = 2
"""A single token's earlier occurrence is mostly a coincidence (a common word), not a copy."""
VERIFY_BASE_COST = 1.0
"""A verify pass's cost in decode steps of one row, beside ``VERIFY_COST_PER_DRAFT`` a draft
token (docs/adr/0027 has the measurement they come from)."""
VERIFY_COST_PER_DRAFT = 0.13
PRIOR_ACCEPTED, PRIOR_TESTED = 1.0, 2.0
"""A new row's acceptance counts (a rate of one half): it drafts at once, and its own verifies
soon outweigh the prior."""
MEMORY = 0.7
"""Weight of a row's earlier verifies against its latest one (its acceptance rate follows what it
is writing now: copying, then composing)."""
MAX_WAIT = 64
"""Most drafting steps a row refused waits before its next probing verify."""
Verify = Callable[[list[int], int, Any, Any], torch.Tensor]
"""``verify(tokens, position, cache, lora)``: ``tokens`` at positions ``position``... after the
states in ``cache`` (which it extends), every position's float32 logits, (len(tokens), vocab)."""


def forward_verify(model: Any, cache_name: str) -> Verify:
    """A verify pass through the model's own forward (architectures without the lean layers)."""

    def verify(tokens: list[int], position: int, cache: Any, lora: Any) -> torch.Tensor:
        out = model(
            input_ids=torch.tensor([tokens]),
            attention_mask=torch.ones((1, position + len(tokens)), dtype=torch.long),
            position_ids=torch.arange(position, position + len(tokens))[None],
            use_cache=True,
            logits_to_keep=0,  # every position's
            **{cache_name: cache},
        )
        return out.logits[0].float()

    return verify


def propose(
    tokens: torch.Tensor, count: int, longest: int = LONGEST_MATCH, shortest: int = SHORTEST_MATCH
) -> list[int]:
    """Up to ``count`` tokens that followed the latest earlier occurrence of the longest suffix of
    ``tokens`` (1-D), from ``longest`` tokens down to ``shortest``; empty where none occurs."""
    length = tokens.shape[0]
    for n in range(min(longest, length - 1), shortest - 1, -1):
        # Windows that end before the last token: every earlier occurrence, not the suffix itself.
        windows = tokens[: length - 1].unfold(0, n, 1)
        found = (windows == tokens[length - n :]).all(dim=1).nonzero()
        if len(found):
            start = int(found[-1]) + n
            return tokens[start : start + count].tolist()
    return []


def accept(
    logits: torch.Tensor,
    draft: Sequence[int],
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    draft_probs: torch.Tensor | None = None,
) -> tuple[int, int]:
    """How many of ``draft`` are accepted and the token after them, from ``logits`` (len(draft) + 1,
    vocab): row ``i`` is the distribution of the token after draft token ``i - 1`` (row 0: after
    the token the draft follows). Greedy (``temperature`` 0): the draft while it is the argmax,
    then the argmax. Sampled: draft token ``x``, drawn from ``q`` (row ``i`` of ``draft_probs``;
    None: each token chosen outright, a point mass), is accepted with probability
    ``min(1, p(x) / q(x))``, and the first rejected is replaced by a draw from ``max(0, p - q)``
    (for a point mass: ``p`` without ``x``); all accepted, one more draw from the last row. Either
    way every token keeps its probability ``p`` under the row's temperature and top-p."""
    if temperature == 0:
        best = logits.argmax(dim=-1).tolist()
        taken = 0
        while taken < len(draft) and best[taken] == draft[taken]:
            taken += 1
        return taken, best[taken]
    rows = logits.shape[0]
    probs = sampling_probs(logits, torch.full((rows,), temperature), torch.full((rows,), top_p))
    for i, token in enumerate(draft):
        drawn = 1.0 if draft_probs is None else float(draft_probs[i, token])
        if float(torch.rand((), generator=generator)) * drawn < float(probs[i, token]):
            continue
        if draft_probs is None:
            rest = probs[i].clone()
            rest[token] = 0.0
        else:
            rest = (probs[i] - draft_probs[i]).clamp_(min=0.0)
            if not bool(rest.any()):  # p within rounding of q: nothing left over, so p itself
                rest = probs[i]
        return i, draw_one(rest, generator)
    return len(draft), draw_one(probs[-1], generator)


PROBE_CACHED = 40
"""The probe's prompt: on the CPU where it found a difference, verifies after a 40-token prompt
differed from the second position on (after 5 tokens, from the fifth)."""

_probed: dict[tuple[str, str, int, int], bool] = {}
"""Probe results by (model directory, dtype, compute threads, verify length): a model loaded again
(after an eviction, a crash) is not probed again."""


def verify_matches_steps(model: Any, decoder: Any, positions: int) -> bool:
    """Whether ``decoder.verify`` gives each position the logits that a one-row decode step
    computes there, bit for bit, for ``model`` on this CPU: decode steps of ``positions`` random
    tokens after a prompt of ``PROBE_CACHED`` in a scratch cache, against a verify of the first two
    and one of them all, run on a compute thread (the engine's thread count: oneDNN may choose its
    kernels by it). Greedy rows accept a draft token when it is the argmax of the verify's logits,
    so where these differ in their last bits a near tie resolves another way than plain decoding
    would and the answer changes. The lean layers are written so that they match (each position's
    attention is the step's own), and they did on the CPUs this was built on, float32 and bf16;
    on a 2-core AMD EPYC with AVX-512 BF16 (2026-12-07) oneDNN's one-row product over 1,536 inputs
    summed in another order than its product of several rows, and 33 of 48 served summaries
    changed (docs/adr/0027, sixth addendum), so ``auto`` asks first. The decoder now pads such
    products (``LeanDecoder.match_lone_rows``, seventh addendum); the probe still guards against
    what that check does not cover."""
    path = str(getattr(model.config, "name_or_path", "") or "")
    key = (path, str(next(model.parameters()).dtype), threads.compute_threads(), positions)
    if path and key in _probed:
        return _probed[key]
    matches = threads.on_compute_thread(lambda: _probe(model, decoder, max(2, positions)))
    if path:
        _probed[key] = matches
    return matches


def verify_failed(model_dir: str | Path) -> bool:
    """Whether a probe found that the model loaded from ``model_dir`` does not reproduce its decode
    steps in a verify (so ``auto`` does not speculate on it)."""
    return any(not matches for (path, *_), matches in list(_probed.items()) if path == str(model_dir))


@torch.inference_mode()
def _probe(model: Any, decoder: Any, positions: int) -> bool:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.config.vocab_size, (PROBE_CACHED + positions,), generator=generator)
    cache = new_cache(model.config)
    decoder.prefill([(tokens[:PROBE_CACHED].tolist(), 0, cache)])
    steps = []
    for position in range(PROBE_CACHED, PROBE_CACHED + positions):
        attention = torch.ones((1, position + 1), dtype=torch.long)
        steps.append(decoder(tokens[position : position + 1], torch.tensor([position]), attention, cache, None)[0])
    for count in (2, positions):
        truncate(cache, PROBE_CACHED)
        verified = decoder.verify(tokens[PROBE_CACHED : PROBE_CACHED + count].tolist(), PROBE_CACHED, cache)
        if not all(torch.equal(row, step) for row, step in zip(verified, steps[:count], strict=True)):
            return False
    return True


def expected_tokens(rate: float, drafts: int) -> float:
    """Tokens a verify of ``drafts`` yields when each is accepted with probability ``rate`` until
    the first rejection: the accepted ones and the one that follows them."""
    return sum(rate**i for i in range(drafts + 1))


def best_length(rate: float, available: int, draft_cost: float = 0.0) -> int:
    """The draft length (at most ``available``) with the most tokens per unit of cost (a verify's,
    and ``draft_cost`` decode steps a draft token to draft it), or 0 when no length beats a plain
    decode step (one token for a cost of one)."""
    best, gain = 0, 1.0
    for m in range(1, available + 1):
        per_cost = expected_tokens(rate, m) / (VERIFY_BASE_COST + (VERIFY_COST_PER_DRAFT + draft_cost) * m)
        if per_cost > gain:
            best, gain = m, per_cost
    return best


def speculates(row: Row) -> bool:
    """Whether the verify's acceptance rule reproduces this row's decoding (see the module's
    docstring). Not for a LoRA adapter's rows: the verify computes their adapter products over all
    its positions at once, which in float32 round differently from a decode step's one row."""
    request = row.pending.request
    params = request.params
    return (
        row.pending.adapter is None
        and request.grammar is None
        and params.presence_penalty == 0
        and params.frequency_penalty == 0
        and not params.logprobs
        and (params.greedy or params.seed is None)
    )


@dataclass
class _Rate:
    """A draft source's recent acceptance for one row, and its wait after refusals."""

    accepted: float = PRIOR_ACCEPTED
    tested: float = PRIOR_TESTED
    wait: int = 0  # drafting steps left before the next probe
    gap: int = 2  # the wait after the next refusal


@dataclass
class _Tracked:
    """What speculation keeps of the row it serves: its tokens so far and its recent acceptance
    of each source's drafts (prompt lookup's, the draft model's)."""

    key: tuple[str, int]
    history: torch.Tensor
    length: int
    start: int  # where its output begins in ``history`` (after its prompt and prediction)
    lookup: _Rate = field(default_factory=_Rate)
    model: _Rate = field(default_factory=_Rate)

    def sync(self, row: Row) -> torch.Tensor:
        """Its prompt, prediction and output, with the tokens streamed since the last call appended."""
        new = row.output_ids[self.length - self.start :]
        if new:
            end = self.length + len(new)
            if end > self.history.shape[0]:
                grown = torch.empty(end * 2, dtype=torch.long)
                grown[: self.length] = self.history[: self.length]
                self.history = grown
            self.history[self.length : end] = torch.tensor(new)
            self.length = end
        return self.history[: self.length]


class Speculation:
    """Speculative decoding for one runner; ``step`` advances a row decoding alone."""

    def __init__(
        self,
        mode: str,
        tokens: int,
        verify: Verify,
        streamer: Streamer,
        draft_model: DraftModel | None = None,
        arrived: Callable[[], bool] | None = None,
    ) -> None:
        """``arrived()``: whether a request is waiting for the engine (the draft model then stops
        drafting, so that it waits for no whole draft)."""
        if mode not in MODES:
            raise ValueError(f"speculative_decoding must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.tokens = tokens
        self.verify = verify
        self.streamer = streamer
        self.draft_model = draft_model
        self.arrived = arrived
        self._tracked: _Tracked | None = None
        self.verifies = 0
        self.drafted = 0
        self.accepted = 0
        self.modeled = 0  # draft tokens the draft model proposed

    @classmethod
    def build(
        cls,
        config: EngineConfig,
        model: Any,
        decoder: Any,
        streamer: Streamer,
        cache_name: str,
        draft_model: DraftModel | None = None,
        arrived: Callable[[], bool] | None = None,
    ) -> Speculation | None:
        """Speculation for a runner whose decode steps run ``decoder`` (the lean layers) or, when
        it is None, the model's forward; None when it is off, when single rows decode with int8
        weights (a verify reads the model's own, so accepted tokens would differ from those the
        int8 steps choose), and under ``auto`` (the default) where there are no lean layers: the
        forward's verify matches a decode step only up to rounding, in float32 too, so greedy
        answers could differ from plain decoding's; ``ngram`` asks for it anyway."""
        mode = config.speculative_decoding
        if mode == "off" or (decoder is not None and decoder.int8) or (mode == "auto" and decoder is None):
            return None
        if mode == "auto" and not verify_matches_steps(model, decoder, config.speculative_tokens + 1):
            log.warning(
                "speculative decoding is off for %s: on this CPU, in %s, a verify does not give each position "
                "a decode step's logits bit for bit, so greedy answers could change ('ngram' speculates anyway)",
                getattr(model.config, "name_or_path", "this model"),
                next(model.parameters()).dtype,
            )
            return None
        # The lean layers' verify reproduces their decode steps (probed under auto); the forward only up to rounding.
        verify = decoder.verify if decoder is not None else forward_verify(model, cache_name)
        return cls(config.speculative_decoding, config.speculative_tokens, verify, streamer, draft_model, arrived)

    def stats(self) -> dict[str, int]:
        return {
            "spec_verifies": self.verifies,
            "spec_draft_tokens": self.drafted,
            "spec_accepted_tokens": self.accepted,
            "spec_model_draft_tokens": self.modeled,
        }

    def step(self, state: BatchState[Row], token: int, limit: int, lora: Any, decode: Callable[[], None]) -> int:
        """Advance ``state``'s one row, whose ``token`` was just chosen and streamed: verify a draft
        after it where one is found and worth it, else ``decode()`` (a plain step). ``limit``: the
        cache positions the row may take. Returns the tokens streamed here (after ``token``)."""
        row = state.rows[0]
        position = int(state.next_pos[0])  # where ``token`` goes
        params = row.pending.request.params
        # The draft, the token after it and everything before fit the cache, the context and max_tokens.
        room = min(
            self.tokens,
            limit - position - 1,
            self.streamer.context_length - position - 2,
            params.max_tokens - row.generated - 1,
        )
        # The verify attends to every cached position: the row's cache is exactly its positions so
        # far, and can be rolled back (sliding-window layers cannot).
        whole = state.attention.shape[1] == position and bool(state.attention.all())
        if room < 1 or not whole or not speculates(row) or not grows_in_place(state.cache):
            decode()
            return 0
        tracked = self._track(row)
        history = tracked.sync(row)
        draft = propose(history, room)
        rate, length = tracked.lookup, self._length(tracked.lookup, len(draft))
        sampling = state.sampling
        temperature, top_p, generator = (
            float(sampling.temperature[0]),
            float(sampling.top_p[0]),
            sampling.generators[0],
        )
        drawn_from = None  # the draft model's distributions its sampled draft was drawn from
        model = self.draft_model
        if length == 0 and model is not None:  # no copy to draft from (or none worth it): the model's guess
            written = [*row.pending.request.prompt_token_ids, *row.output_ids]  # the prediction is not text
            if model.fits(len(written), room):
                rate, length = tracked.model, self._length(tracked.model, room, model.cost)
                if length:
                    draft, drawn_from = self._propose(model, written, length, temperature, top_p, generator)
                    length = len(draft)  # none while it reads a new prompt
                    self.modeled += length
        if length == 0:
            decode()
            return 0
        draft = draft[:length]
        logits = self.verify([token, *draft], position, state.cache, lora)
        taken, after = accept(logits, draft, temperature, top_p, generator, drawn_from)
        truncate(state.cache, position + 1 + taken)
        self._record(rate, taken, len(draft))
        row.drafted += len(draft)
        streamed = 0
        for i, emitted in enumerate([*draft[:taken], after]):
            if row.finished:
                break
            if i < taken:
                row.draft_accepted += 1
            self.streamer.advance(row, emitted, position + 2 + i, None, 0)
            streamed += 1
        row.chosen = after  # streamed (or past the row's end): the next step feeds it
        state.attention = torch.cat([state.attention, torch.ones((1, 1 + taken), dtype=state.attention.dtype)], 1)
        state.next_pos = state.next_pos + 1 + taken
        state.logits = logits[taken : taken + 1]
        return streamed

    def _propose(
        self,
        model: DraftModel,
        written: list[int],
        length: int,
        temperature: float,
        top_p: float,
        generator: torch.Generator | None,
    ) -> tuple[list[int], torch.Tensor | None]:
        """The draft model's proposal (and, for a sampled row, the distributions it was drawn
        from); where it fails (its memory, say), it is given up and the target decodes on without
        it, rather than the batch failing."""
        try:
            return model.propose(written, length, temperature, top_p, generator, self.arrived)
        except RuntimeError:
            log.exception("draft model %s failed; speculating without it from now on", model.name)
            self.draft_model = None
            return [], None

    def _track(self, row: Row) -> _Tracked:
        key = (row.pending.request.request_id, row.index)
        if self._tracked is None or self._tracked.key != key:
            request = row.pending.request
            known = torch.tensor([*request.prompt_token_ids, *request.prediction_token_ids], dtype=torch.long)
            self._tracked = _Tracked(key, known, len(known), len(known))
        return self._tracked

    def _length(self, source: _Rate, available: int, draft_cost: float = 0.0) -> int:
        """How many of the ``available`` draft tokens of a source (costing ``draft_cost`` decode
        steps each to draft) to verify now (0: decode plainly)."""
        if available == 0 or self.mode == "ngram":
            return available
        if source.wait > 0:
            source.wait -= 1
            # A whole draft probes, whatever the rate says (shorter probes of a draft model kept
            # rows refused longer, docs/performance.md).
            return available if source.wait == 0 else 0
        rate = source.accepted / source.tested
        if best_length(rate, self.tokens, draft_cost) == 0:  # not even a whole draft would pay: wait, then probe
            source.wait, source.gap = source.gap, min(2 * source.gap, MAX_WAIT)
            return 0
        return best_length(rate, available, draft_cost)  # a short draft may not pay where a whole one would

    def _record(self, source: _Rate, taken: int, drafted: int) -> None:
        """A verify of ``drafted`` tokens accepted ``taken``: every position up to the first
        rejection was a trial."""
        self.verifies += 1
        self.drafted += drafted
        self.accepted += taken
        source.accepted = MEMORY * source.accepted + taken
        source.tested = MEMORY * source.tested + min(taken + 1, drafted)
        if taken:
            source.gap = 2
