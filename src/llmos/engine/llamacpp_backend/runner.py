"""Continuous batching over llama.cpp for chat models kept as GGUF.

The shared engine loop (``engine.runner``) schedules; this backend makes one ``llama_decode``
call per iteration: every running row's next token plus a bounded chunk of the prompts being
prefilled, each token tagged with its row's sequence, so a newcomer never stalls the running rows
for more than one chunk and nobody waits for the slowest. Rows are llama.cpp sequences in one
shared cache; a row that finishes leaves its cells behind as a cached prefix, and a new prompt
starts from the longest prefix that a cached, running or prefilling sequence of its tenant holds:
sharing is free in a unified cache. Parked rows (over their tenant's share) keep their cells and
are left out of the decode call.

llama.cpp's step costs less than the torch backend's for one row but grows about linearly with
rows, where torch's barely does: this backend is the faster one for a few clients, the torch one
for many (docs/performance.md has the figures).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmos.engine.choices import Streamer, batch_sampling, error_delta
from llmos.engine.config import EngineConfig
from llmos.engine.llamacpp_backend.library import DecodeError, LlamaCpp
from llmos.engine.protocol import GenerationRequest
from llmos.engine.runner import GenerationRunner
from llmos.engine.sampling import BatchSampling, concat_counts
from llmos.engine.scheduler import Pending, Row
from llmos.engine.threads import enter_helper_thread
from llmos.errors import InvalidRequestError

log = logging.getLogger(__name__)
CACHED_SEQUENCES = 8  # finished sequences kept as prefixes beside the running ones
MIN_SHARED = 16  # a prompt sharing fewer tokens with one being prefilled does not wait for it


@dataclass
class SeqRow(Row):
    """One choice of a request: a sequence of the cache."""

    seq: int = -1
    tokens: list[int] = field(default_factory=list)
    """What the sequence holds in the cache, position by position."""
    feed: int | None = None
    """The token it decodes next (chosen, streamed, not yet in the cache)."""


@dataclass
class _Prefill:
    pending: Pending
    prompt: list[int]
    seqs: list[int]
    """One sequence per choice; the first one is prefilled, the others share it at the end."""
    done: int = 0
    computing: bool = False
    """Whether it has computed prompt tokens itself: from then on it takes no shared prefix."""

    @property
    def tokens(self) -> list[int]:
        return self.prompt[: self.done]


@dataclass
class _Cached:
    scope: str
    seq: int
    tokens: list[int]


@dataclass
class _Batch:
    rows: list[SeqRow]
    sampling: BatchSampling
    counts: torch.Tensor | None

    def keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        idx = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.sampling = self.sampling.select(idx)
        self.counts = self.counts[idx] if self.counts is not None else None

    def split_off(self, indices: list[int]) -> _Batch:
        """Remove the rows at ``indices`` (in order) and return them as a batch of their own."""
        idx = torch.tensor(indices, dtype=torch.long)
        other = _Batch(
            [self.rows[i] for i in indices],
            self.sampling.select(idx),
            self.counts[idx] if self.counts is not None else None,
        )
        gone = set(indices)
        self.keep([i for i in range(len(self.rows)) if i not in gone])
        return other

    def join(self, other: _Batch, vocab: int) -> None:
        self.counts = concat_counts(self.counts, len(self.rows), other.counts, len(other.rows), vocab)
        self.rows = self.rows + other.rows
        self.sampling = self.sampling.concat(other.sampling)


class LlamaCppRunner(GenerationRunner):
    """Serves one GGUF chat model on the shared engine loop, without adapters (the engine runs
    those on a torch runner of the same model)."""

    cache_setting = "llamacpp_cache_tokens"

    def __init__(
        self,
        gguf: Path,
        tokenizer: Any,
        eos_ids: set[int],
        *,
        context_length: int,
        config: EngineConfig | None = None,
        name: str = "model",
    ) -> None:
        config = config or EngineConfig()
        self.prefill_budget = config.prefill_chunk_tokens
        self.llama = LlamaCpp(
            gguf,
            n_ctx=config.llamacpp_cache_tokens,
            n_seq_max=config.max_batch_size + CACHED_SEQUENCES,
            n_batch=config.prefill_chunk_tokens + config.max_batch_size,
            threads=config.threads or os.cpu_count() or 1,
        )
        super().__init__(name, config, min(config.max_batch_size, self.llama.n_seq_max - 1))
        self.context_length = min(context_length, self.llama.n_ctx)
        # Prefix sharing follows the prefix cache setting (0 turns it off in every backend).
        self.shares_prefixes = self.llama.shares_prefixes and config.prefix_cache_bytes > 0
        self.streamer = Streamer(tokenizer, eos_ids, self.context_length)
        self._free = deque(range(self.llama.n_seq_max))
        self._cached: deque[_Cached] = deque()  # oldest first
        self._batch: _Batch | None = None
        self._parked: _Batch | None = None
        self._prefill_jobs: list[_Prefill] = []
        self.prefix_hits = 0
        self.prefix_tokens_reused = 0
        self.cells_reserved = 0

    def stats(self) -> dict[str, Any]:
        return super().stats() | {
            "backend": "llama.cpp",
            "prefix_cache_hits": self.prefix_hits,
            "prefix_tokens_reused": self.prefix_tokens_reused,
            "kv_cache_bytes": self.kv_bytes,
            "kv_cache_budget_bytes": self.cache_bytes,
        }

    # -- the scheduler's questions ---------------------------------------------------------
    def _reservation(self, request: GenerationRequest, virtual: Any = None) -> int:
        return min(self.context_length, len(request.prompt_token_ids) + request.params.max_tokens)

    def _fits(self, reserved: list[int]) -> bool:
        return sum(reserved) <= self.llama.n_ctx

    @property
    def budget_tokens(self) -> int:
        return self.llama.n_ctx

    def check_fits(self, request: GenerationRequest, virtual: Any = None) -> None:
        """Refuse (400) a request that could not run even alone."""
        if not request.prompt_token_ids:
            raise InvalidRequestError("the prompt has no tokens", param="messages", code="empty_prompt")
        if request.params.n > self.max_batch_size:
            raise InvalidRequestError(
                f"n is {request.params.n}; {self.name} decodes at most {self.max_batch_size} sequences at once",
                param="n",
            )
        if len(request.prompt_token_ids) >= self.context_length:
            raise InvalidRequestError(
                f"the prompt has {len(request.prompt_token_ids)} tokens; {self.name} is served with a context of "
                f"{self.context_length} (llamacpp_cache_tokens)",
                param="messages",
                code="context_length_exceeded",
            )
        super().check_fits(request, virtual)

    def _rows(self) -> Iterable[SeqRow]:
        for batch in (self._batch, self._parked):
            if batch is not None:
                yield from batch.rows

    def _prefilling(self) -> Iterable[Pending]:
        return [job.pending for job in self._prefill_jobs]

    @property
    def kv_bytes(self) -> int:
        """Cache memory the running rows may grow into (the cells are allocated at load)."""
        return self.cells_reserved * self.llama.kv_bytes_per_token

    @property
    def cache_bytes(self) -> int:
        return self.llama.n_ctx * self.llama.kv_bytes_per_token

    def _enter_thread(self) -> None:
        enter_helper_thread()  # torch only samples here, on one core: llama.cpp has its own threads

    def _release(self) -> None:
        self.llama.close()  # native memory: nobody else would free it (the engine thread was its only user)

    # -- the engine thread -----------------------------------------------------------------
    def _start(self, pending: Pending) -> None:
        self.cells_reserved += pending.rows * pending.reserve
        self._prefill_jobs.append(_Prefill(pending, list(pending.request.prompt_token_ids), self._seqs(pending)))

    def _cancel_prefill(self, pending: Pending) -> None:
        for job in [j for j in self._prefill_jobs if j.pending is pending]:
            self._prefill_jobs.remove(job)
            self._release_seqs(job.seqs, job.pending)

    def _rebalance(self, caps: dict[str, int]) -> None:
        self._retire_finished()
        running = [r.share for r in self._batch.rows] if self._batch else []
        parked = [r.share for r in self._parked.rows] if self._parked else []
        park, resume = self.scheduler.shares(running, parked, caps)
        back = self._parked.split_off(resume) if self._parked is not None and resume else None
        if self._parked is not None and not self._parked.rows:
            self._parked = None
        if self._batch is not None and park:
            self._parked = self._joined(self._parked, self._batch.split_off(park))
            if not self._batch.rows:
                self._batch = None
        if back is not None:
            self._batch = self._joined(self._batch, back)

    def _joined(self, batch: _Batch | None, other: _Batch) -> _Batch:
        if batch is None:
            return other
        batch.join(other, self.llama.n_vocab)
        return batch

    def _seqs(self, pending: Pending) -> list[int]:
        """Free sequence ids for its choices, forgetting the oldest cached prefixes if need be."""
        while len(self._free) < pending.request.params.n and self._cached:
            self._evict_cached()
        return [self._free.popleft() for _ in range(pending.request.params.n)]

    def _evict_cached(self) -> None:
        cached = self._cached.popleft()
        self.llama.forget(cached.seq)
        self._free.append(cached.seq)

    def _execute(self) -> None:
        """One decode call: every running row's next token, then up to ``prefill_budget`` prompt
        tokens; stream what it yields (rows that finished are retired by ``_rebalance`` just before)."""
        rows = list(self._batch.rows) if self._batch else []
        chunks = self._plan_prefill()
        if not rows and not chunks:
            return
        # Cells the running rows are owed come first: cached prefixes beyond them are forgotten.
        while self._cached and self.cells_reserved + sum(len(c.tokens) for c in self._cached) > self.llama.n_ctx:
            self._evict_cached()
        tokens = [r.feed for r in rows]
        assert None not in tokens, "every running row has its next token chosen"
        positions = [len(r.tokens) for r in rows]
        seqs = [r.seq for r in rows]
        outputs = [True] * len(rows)
        for job, take in chunks:
            tokens += job.prompt[job.done : job.done + take]
            positions += range(job.done, job.done + take)
            seqs += [job.seqs[0]] * take
            outputs += [False] * (take - 1) + [job.done + take == len(job.prompt)]
        try:
            logits = self.llama.decode(np.array(tokens), np.array(positions), np.array(seqs), np.array(outputs))
        except DecodeError as exc:
            self._failed_decode(rows, chunks, exc)
            return
        for row in rows:
            assert row.feed is not None
            row.tokens.append(row.feed)
            row.feed = None
        for job, take in chunks:
            job.done += take
            job.computing = True
            self.prefill_tokens += take
        out = torch.from_numpy(logits)
        if self._batch is not None and rows:
            self._choose(self._batch, out[: len(rows)])
        finished = [job for job, _ in chunks if job.done == len(job.prompt)]
        for job, row_logits in zip(finished, out[len(rows) :], strict=True):
            self._prefill_jobs.remove(job)
            self._start_rows(job, row_logits)
        self._retire_finished()
        if self._batch is not None:  # every token of the step chosen: masks beside the next decode
            self.streamer.prefetch_masks(self._batch.rows)

    def _plan_prefill(self) -> list[tuple[_Prefill, int]]:
        """Chunks of the prompts to prefill this step, in arrival order, within the budget. A
        prompt first takes the longest prefix another sequence of its tenant holds; one that
        shares a longer prefix with a prompt prefilled before it waits for that one."""
        budget, planned = self.prefill_budget, list[tuple[_Prefill, int]]()
        for job in list(self._prefill_jobs):
            if budget <= 0:
                break
            self._share_prefix(job)
            ahead = [j for j, _ in planned if j.pending.request.tenant == job.pending.request.tenant]
            if self.shares_prefixes and any(_common(job.prompt, j.prompt) >= job.done + MIN_SHARED for j in ahead):
                continue  # its prefix is being computed: shared next step instead of computed twice
            take = min(len(job.prompt) - job.done, budget)
            budget -= take
            planned.append((job, take))
        return planned

    def _share_prefix(self, job: _Prefill) -> None:
        """Start ``job`` from the longest prefix another sequence of its tenant holds. Looked for
        until it computes its own first chunk (each look compares its prompt with every sequence)."""
        if job.computing or not self.shares_prefixes:
            return
        tenant = job.pending.request.tenant
        sources: list[tuple[int, list[int]]] = [(c.seq, c.tokens) for c in self._cached if c.scope == tenant]
        sources += [(r.seq, r.tokens) for r in self._rows() if r.tenant == tenant and not r.finished]
        sources += [
            (j.seqs[0], j.tokens) for j in self._prefill_jobs if j is not job and j.pending.request.tenant == tenant
        ]
        best, seq = job.done, -1
        for src, tokens in sources:
            # The last prompt token is always computed: its logits choose the first token.
            length = min(_common(job.prompt, tokens), len(job.prompt) - 1)
            if length > best:
                best, seq = length, src
        if seq < 0:
            return
        self.llama.forget(job.seqs[0])
        self.llama.share(seq, job.seqs[0], best)
        self.prefix_hits += 1
        self.prefix_tokens_reused += best - job.done
        job.done = best

    def _failed_decode(self, rows: list[SeqRow], chunks: list[tuple[_Prefill, int]], exc: DecodeError) -> None:
        """Out of room (the cache is as before the call): forget every cached prefix and try
        again next step; once none is left, the prompts of this step fail (the running rows'
        cells are reserved, so they are not at fault). Any other failure fails everything in the
        batch, whose cells llama.cpp may have written in part."""
        log.error("llama_decode failed on %s: %s", self.name, exc)
        if exc.no_room and self._cached:
            while self._cached:
                self._evict_cached()
            return
        victims = [job for job, _ in chunks]
        if not (exc.no_room and chunks):
            for row in rows:
                row.finished = True
                row.tokens = []  # its cells may be half-written: forgotten, never a cached prefix
                row.pending.sink(error_delta(row.index, exc))
        for job in victims:
            self._prefill_jobs.remove(job)
            self._release_seqs(job.seqs, job.pending)
            job.pending.fail(exc)
        self._retire_finished()

    def _choose(self, batch: _Batch, logits: torch.Tensor) -> None:
        lengths = [len(r.tokens) + 1 for r in batch.rows]
        fresh = sum(1 for r in batch.rows if r.chosen is None)
        chosen = self.streamer.choose(batch.rows, logits, batch.sampling, batch.counts, lengths)
        self._note_step(len(batch.rows), fresh)
        for row, token in zip(batch.rows, chosen.tolist(), strict=True):
            if not row.finished:
                row.feed = token

    def _start_rows(self, job: _Prefill, logits: torch.Tensor) -> None:
        """A prompt is in the cache: its choices become rows (sharing its cells) and their first
        tokens are chosen and streamed at once."""
        request = job.pending.request
        for seq in job.seqs[1:]:
            self.llama.share(job.seqs[0], seq, len(job.prompt))
        rows = [
            SeqRow(job.pending, i, self.streamer.new_text(request), seq=seq, tokens=list(job.prompt))
            for i, seq in enumerate(job.seqs)
        ]
        sampling = batch_sampling(rows)
        uses_penalties = sampling.uses_penalties
        fresh = _Batch(rows, sampling, torch.zeros(len(rows), logits.shape[-1]) if uses_penalties else None)
        self.prefills += 1
        self._choose(fresh, logits.expand(len(rows), -1).contiguous())
        if self._batch is None:
            self._batch = fresh
        else:
            self._batch.join(fresh, logits.shape[-1])

    def _retire_finished(self) -> None:
        """Rows that finished (running or parked) leave their batch; a request's last choice to
        finish returns its cells, and its first choice's sequence stays as a cached prefix."""
        for batch in (self._batch, self._parked):
            if batch is None:
                continue
            gone = [r for r in batch.rows if r.finished]
            if not gone:
                continue
            batch.keep([i for i, r in enumerate(batch.rows) if not r.finished])
            for row in gone:
                self._retire(row)
        if self._batch is not None and not self._batch.rows:
            self._batch = None
        if self._parked is not None and not self._parked.rows:
            self._parked = None

    def _retire(self, row: SeqRow) -> None:
        self.cells_reserved -= row.pending.reserve
        # One choice of a request is kept (its siblings share its prompt and would crowd others out).
        if len(row.tokens) < MIN_SHARED or row.index > 0 or not self.shares_prefixes:
            self.llama.forget(row.seq)
            self._free.append(row.seq)
            return
        self._cached.append(_Cached(row.pending.request.tenant, row.seq, row.tokens))
        while len(self._cached) > CACHED_SEQUENCES or (self._cached and not self._free):
            self._evict_cached()

    def _release_seqs(self, seqs: list[int], pending: Pending) -> None:
        for seq in seqs:
            self.llama.forget(seq)
            self._free.append(seq)
        self.cells_reserved -= len(seqs) * pending.reserve


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    differ = np.flatnonzero(x != y)
    return int(differ[0]) if len(differ) else n
