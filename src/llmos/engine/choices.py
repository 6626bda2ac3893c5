"""What every generating backend does with a step's logits: choose each row's next token
(penalties, greedy or seeded sampling, logprobs) and stream it as text, ending the row on an
end-of-sequence token, a stop sequence, ``max_tokens`` or the context length.

A row is one choice of one request; backends keep their own rows (the cache they point into
differs), and this module needs only the fields of ``StreamedRow``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch

from llmos.engine.detokenize import IncrementalText
from llmos.engine.grammar import MaskPrefetch, RowMatcher, advance, mask_logits
from llmos.engine.protocol import FinishReason, GenerationDelta, GenerationRequest, TokenLogprob, TopLogprob
from llmos.engine.sampling import BatchSampling, apply_penalties, select_tokens, token_logprobs

log = logging.getLogger(__name__)
Sink = Callable[[GenerationDelta], None]


class StreamedRow(Protocol):
    pending: Any  # has ``request`` (a GenerationRequest) and ``sink`` (where its deltas go)
    index: int
    text: IncrementalText
    generated: int
    finished: bool
    held_ids: list[int]
    chosen: int | None
    grammar: RowMatcher | None
    output_ids: list[int]
    drafted: int
    draft_accepted: int


class Streamer:
    """Turns chosen tokens into deltas for one model (its end-of-sequence ids, context length
    and tokenizer)."""

    def __init__(self, tokenizer: Any, eos_ids: set[int], context_length: int) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.context_length = context_length
        self.masks = MaskPrefetch()

    def new_text(self, request: GenerationRequest) -> IncrementalText:
        return IncrementalText(self.decode, request.params.stop)

    def choose(
        self,
        rows: Sequence[StreamedRow],
        logits: torch.Tensor,
        sampling: BatchSampling,
        counts: torch.Tensor | None,
        lengths: Sequence[int],
    ) -> torch.Tensor:
        """Choose each row's next token from ``logits`` (B, V) and stream it; ``lengths`` are the
        rows' sequence lengths once it is added. A row whose token was chosen already keeps it
        (and is not streamed twice); finished rows are not streamed. A row whose choosing or
        streaming raises fails alone: it gets its error delta and is finished, the others go on.
        The constrained rows' forbidden tokens are masked in ``logits`` itself (the caller's
        tensor: it is not read again)."""
        self.masks.wait()
        if counts is not None:
            logits = apply_penalties(logits, counts, sampling.presence, sampling.frequency)
        asks = [r.pending.request.params for r in rows]
        want_k = max((params.top_logprobs for params in asks if params.logprobs), default=-1)
        # Taken before any grammar masks a row: logprobs are the model's own distribution.
        logp = torch.log_softmax(logits, dim=-1) if want_k >= 0 else None
        try:
            chosen = self._tokens(rows, logits, sampling, counts)
            lp = self._step_logprobs(logp, chosen, want_k)
            steps: list[tuple[Any, int] | None] = [(lp, i) for i in range(len(rows))]
        except Exception:
            log.exception("choosing the next tokens of %d rows failed; choosing them one by one", len(rows))
            chosen, steps = torch.zeros(len(rows), dtype=torch.long), []
            for i, row in enumerate(rows):
                try:
                    one = self._tokens(
                        [row],
                        logits[i : i + 1],
                        sampling.select(torch.tensor([i])),
                        counts[i : i + 1] if counts is not None else None,
                    )
                    chosen[i] = one[0]
                    row_logp = logp[i : i + 1] if logp is not None else None
                    steps.append((self._step_logprobs(row_logp, one, want_k), 0))
                except Exception as exc:
                    self._fail(row, exc)
                    steps.append(None)
        for i, (row, token, step) in enumerate(zip(rows, chosen.tolist(), steps, strict=True)):
            if row.chosen is not None:
                row.chosen = None
            elif not row.finished and step is not None:
                try:
                    self.advance(row, token, lengths[i], *step)
                except Exception as exc:
                    log.exception("streaming a token failed")
                    self._fail(row, exc)
        return chosen

    def prefetch_masks(self, rows: Iterable[StreamedRow]) -> None:
        """Start computing the next masks of the constrained ``rows``, to run beside the forward
        pass: call it once every token of the step is chosen (a first token chosen later would
        wait for these), right before the pass."""
        self.masks.start([row.grammar for row in rows if row.grammar is not None and not row.finished])

    @staticmethod
    def _step_logprobs(logp: torch.Tensor | None, chosen: torch.Tensor, k: int) -> Any:
        return token_logprobs(logp, chosen, k) if logp is not None else None

    def _tokens(
        self, rows: Sequence[StreamedRow], logits: torch.Tensor, sampling: BatchSampling, counts: torch.Tensor | None
    ) -> torch.Tensor:
        """The rows' next tokens from ``logits`` (penalties applied; the constrained rows masked
        here, in place); ``counts`` (a view of the rows' token counts, for penalties) takes the
        new tokens."""
        early = {i: r.chosen for i, r in enumerate(rows) if r.chosen is not None}
        self._mask(rows, logits, early)
        chosen = select_tokens(logits, sampling, early)
        if counts is not None:
            counted = torch.ones_like(chosen, dtype=logits.dtype)
            for i in early:
                counted[i] = 0  # counted when it was chosen
            counts.scatter_add_(1, chosen[:, None], counted[:, None])
        return chosen

    @staticmethod
    def _mask(rows: Sequence[StreamedRow], logits: torch.Tensor, early: dict[int, int]) -> None:
        """Mask each constrained row's forbidden tokens in ``logits``, in place."""
        constrained, matchers = [], []
        for i, row in enumerate(rows):
            grammar = row.pending.request.grammar
            if grammar is None or i in early or row.finished:
                continue
            if row.grammar is None:
                row.grammar = grammar.matcher()
            constrained.append(i)
            matchers.append(row.grammar)
        if constrained:
            mask_logits(logits, constrained, matchers)

    @staticmethod
    def _fail(row: StreamedRow, exc: Exception) -> None:
        if not row.finished:
            row.finished = True
            row.pending.sink(error_delta(row.index, exc))

    def advance(self, row: StreamedRow, token: int, total_len: int, lp: Any, i: int) -> None:
        """Stream ``token`` for ``row`` (``lp``: the step's logprobs, ``i``: the row's index in them)."""
        params = row.pending.request.params
        row.generated += 1
        row.output_ids.append(token)
        finish: FinishReason | None = None
        complete = row.grammar is not None and advance(row.grammar, token)
        ends = token in self.eos_ids and not params.ignore_eos
        if ends:
            finish = FinishReason.STOP
            text = row.text.flush()
        else:
            text = row.text.push(token)
            if row.text.stopped:
                finish = FinishReason.STOP
            elif complete:  # nothing but the end may follow: the row ends without spending a step on it
                finish = FinishReason.STOP
                text += row.text.flush()
            elif row.generated >= params.max_tokens or total_len >= self.context_length:
                finish = FinishReason.LENGTH
                text += row.text.flush()
        logprobs: tuple[TokenLogprob, ...] = ()
        if lp is not None and params.logprobs:
            logprobs = (self._logprob_entry(token, lp, i, params.top_logprobs),)
        row.finished = finish is not None
        if not ends:
            row.held_ids.append(token)
        if text or finish or logprobs:
            emitted_ids, row.held_ids = tuple(row.held_ids), []
            drafted, accepted = row.drafted, row.draft_accepted
            row.drafted = row.draft_accepted = 0
            row.pending.sink(
                GenerationDelta(
                    index=row.index,
                    text=text,
                    token_ids=emitted_ids,
                    logprobs=logprobs,
                    finish_reason=finish,
                    draft_tokens=drafted,
                    accepted_draft_tokens=accepted,
                )
            )

    def _logprob_entry(self, token: int, lp: Any, i: int, k: int) -> TokenLogprob:
        chosen_lp, top_vals, top_idx = lp
        piece = self.decode([token])
        top = [
            TopLogprob(token=(t := self.decode([tid])), logprob=float(v), bytes=list(t.encode()))
            for v, tid in zip(top_vals[i, :k].tolist(), top_idx[i, :k].tolist(), strict=True)
        ]
        return TokenLogprob(token=piece, logprob=float(chosen_lp[i]), bytes=list(piece.encode()), top_logprobs=top)

    def decode(self, ids: Any) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def error_delta(index: int, exc: Exception) -> GenerationDelta:
    return GenerationDelta(
        index=index, text="", finish_reason=FinishReason.ERROR, error=f"generation failed: {type(exc).__name__}: {exc}"
    )


def abort_delta(index: int) -> GenerationDelta:
    return GenerationDelta(index=index, text="", finish_reason=FinishReason.ABORT)


def batch_sampling(rows: Sequence[StreamedRow]) -> BatchSampling:
    """The sampling parameters of ``rows`` as tensors; a seeded request's choice ``i`` draws
    from a generator seeded with ``seed + i``."""

    def col(attr: str) -> torch.Tensor:
        return torch.tensor([float(getattr(r.pending.request.params, attr)) for r in rows])

    generators: list[torch.Generator | None] = []
    for r in rows:
        seed = r.pending.request.params.seed
        generators.append(torch.Generator().manual_seed((seed + r.index) % 2**63) if seed is not None else None)
    return BatchSampling(
        temperature=col("temperature"),
        top_p=col("top_p"),
        presence=col("presence_penalty"),
        frequency=col("frequency_penalty"),
        generators=generators,
    )


def eos_ids(configs: Iterable[Any], tokenizer: Any) -> set[int]:
    """Every end-of-sequence id named by the model's configs (generation config first) and its tokenizer."""
    ids: set[int] = set()
    for source in configs:
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
