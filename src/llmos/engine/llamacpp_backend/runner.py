"""Continuous batching over llama.cpp for chat models kept as GGUF.

One engine thread, one ``llama_decode`` call per iteration: every running row's next token plus
a bounded chunk of the prompts being prefilled, each token tagged with its row's sequence, so a
newcomer never stalls the running rows for more than one chunk and nobody waits for the
slowest. Rows are llama.cpp sequences in one shared cache; a row that finishes leaves its
cells behind as a cached prefix, and a new prompt starts from the longest prefix that a
cached, running or prefilling sequence of its tenant holds: sharing is free in a unified cache.

On this 2-core CPU llama.cpp's Q4_1 decode step costs a third of the torch backend's for one
row (9-13 ms against 21-26) but grows about linearly with rows, where torch's barely does:
this backend is the faster one for a few clients, the torch one for many (docs/performance.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmos.engine.admission import cache_exceeded
from llmos.engine.choices import Streamer, abort_delta, batch_sampling, error_delta
from llmos.engine.detokenize import IncrementalText
from llmos.engine.llamacpp_backend.library import DecodeError, LlamaCpp
from llmos.engine.protocol import GenerationDelta, GenerationRequest
from llmos.engine.sampling import BatchSampling, concat_counts
from llmos.engine.threads import enter_helper_thread
from llmos.errors import InvalidRequestError
from llmos.kernel.fair_queue import Empty, FairQueue

log = logging.getLogger(__name__)
Sink = Callable[[GenerationDelta], None]
CACHED_SEQUENCES = 8  # finished sequences kept as prefixes beside the running ones
MIN_SHARED = 16  # a prompt sharing fewer tokens with one being prefilled does not wait for it
_CLOSE = "\0close"


@dataclass
class _Pending:
    request: GenerationRequest
    sink: Sink
    reserve: int
    """Cache cells each of its choices may grow to: prompt plus ``max_tokens``, at most the context."""


@dataclass
class _Row:
    """One choice of a request: a sequence of the cache."""

    pending: _Pending
    index: int
    text: IncrementalText
    seq: int
    tokens: list[int]
    """What the sequence holds in the cache, position by position."""
    generated: int = 0
    finished: bool = False
    held_ids: list[int] = field(default_factory=list)
    chosen: int | None = None
    feed: int | None = None
    """The token it decodes next (chosen, streamed, not yet in the cache)."""


@dataclass
class _Prefill:
    pending: _Pending
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
    rows: list[_Row]
    sampling: BatchSampling
    counts: torch.Tensor | None

    def keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        idx = torch.tensor(keep, dtype=torch.long)
        self.rows = [self.rows[i] for i in keep]
        self.sampling = self.sampling.select(idx)
        self.counts = self.counts[idx] if self.counts is not None else None

    def join(self, other: _Batch, vocab: int) -> None:
        self.counts = concat_counts(self.counts, len(self.rows), other.counts, len(other.rows), vocab)
        self.rows = self.rows + other.rows
        self.sampling = self.sampling.concat(other.sampling)


class LlamaCppRunner:
    """Serves one GGUF chat model; the same calls as the torch backend's ``CausalRunner``
    (submit, check_fits, abort, close), without adapters (the engine runs those on torch)."""

    def __init__(
        self,
        gguf: Path,
        tokenizer: Any,
        eos_ids: set[int],
        *,
        context_length: int,
        cache_tokens: int,
        max_batch_size: int = 32,
        batch_wait_s: float = 0.005,
        prefill_budget: int = 256,
        threads: int = 0,
        name: str = "model",
    ) -> None:
        self.name = name
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.prefill_budget = prefill_budget
        self.llama = LlamaCpp(
            gguf,
            n_ctx=cache_tokens,
            n_seq_max=max_batch_size + CACHED_SEQUENCES,
            n_batch=prefill_budget + max_batch_size,
            threads=threads or os.cpu_count() or 1,
        )
        self.context_length = min(context_length, self.llama.n_ctx)
        self.max_batch_size = min(max_batch_size, self.llama.n_seq_max - 1)
        self.streamer = Streamer(tokenizer, eos_ids, self.context_length)
        self._free = deque(range(self.llama.n_seq_max))
        self._cached: deque[_Cached] = deque()  # oldest first
        self._batch: _Batch | None = None
        self._prefilling: list[_Prefill] = []
        self._queue: FairQueue[_Pending | None] = FairQueue()
        self._aborted: set[str] = set()
        self._abort_lock = threading.Lock()
        self._closing = False
        self.tokens_generated = 0
        self.prefills = 0
        self.prefill_tokens = 0  # prompt tokens computed (shared prefixes are not)
        self.prefix_hits = 0
        self.prefix_tokens_reused = 0
        self.peak_rows = 0
        self.cells_reserved = 0
        self.crashed: BaseException | None = None
        self.on_crash: Callable[[BaseException], None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # -- called from other threads ---------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        """Queue a request (after ``check_fits``)."""
        self._queue.put(request.tenant, _Pending(request, sink, self._reservation(request)))

    def _reservation(self, request: GenerationRequest) -> int:
        return min(self.context_length, len(request.prompt_token_ids) + request.params.max_tokens)

    def check_fits(self, request: GenerationRequest) -> None:
        """Refuse (400) a request that could not fit the cache even alone."""
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
        reserve = self._reservation(request)
        if request.params.n * reserve > self.llama.n_ctx:
            raise cache_exceeded(request.params.n, reserve, self.llama.n_ctx, self.name, "llamacpp_cache_tokens")

    def abort(self, request_id: str) -> None:
        with self._abort_lock:
            self._aborted.add(request_id)

    @property
    def busy(self) -> bool:
        return self._batch is not None or bool(self._prefilling) or not self._queue.empty()

    @property
    def kv_bytes(self) -> int:
        """Cache memory the running rows may grow into (the cells are allocated at load)."""
        return self.cells_reserved * self.llama.kv_bytes_per_token

    @property
    def cache_bytes(self) -> int:
        return self.llama.n_ctx * self.llama.kv_bytes_per_token

    def close(self) -> None:
        self._queue.put(_CLOSE, None)
        self._thread.join(timeout=30)
        if not self._thread.is_alive():
            self.llama.close()

    # -- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        enter_helper_thread()  # torch only samples here, on one core: llama.cpp has its own threads
        try:
            self._loop()
        except BaseException as exc:
            log.critical("the engine loop of %s crashed", self.name, exc_info=exc)
            self.crashed = exc
            if self.on_crash is not None:
                self.on_crash(exc)
            self.llama.close()  # native memory: nobody else would free it (this thread was its only user)

    def _loop(self) -> None:
        while not self._closing:
            idle = self._batch is None and not self._prefilling
            for pending in self._collect(block=idle):
                self._prefilling.append(_Prefill(pending, list(pending.request.prompt_token_ids), self._seqs(pending)))
            self._drop_aborted()
            self._iterate()
        for row in self._batch.rows if self._batch else []:
            if not row.finished:
                row.pending.sink(abort_delta(row.index))
        for job in self._prefilling:
            self._end(job.pending, abort_delta)
        for item in self._queue.drain():  # requests queued behind the close get their end too
            if item is not None:
                self._end(item, abort_delta)

    def _collect(self, *, block: bool) -> list[_Pending]:
        """When idle, wait for a request and ``batch_wait`` for company; when busy, take what is
        waiting and fits: in rows and in cache cells (every running choice's reservation)."""
        rows = (len(self._batch.rows) if self._batch else 0) + sum(len(j.seqs) for j in self._prefilling)
        taken: list[_Pending] = []
        deadline = time.monotonic()
        while rows < self.max_batch_size:
            try:
                if block and not taken:
                    item = self._queue.get(timeout=None)
                    deadline = time.monotonic() + self.batch_wait_s  # company is waited for from now
                elif block:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self._queue.get_nowait()
            except Empty:
                break
            if item is None:
                self._closing = True
                break
            if self._take_abort(item.request.request_id):
                self._end(item, abort_delta)
                continue
            n = item.request.params.n
            if rows and (rows + n > self.max_batch_size or self.cells_reserved + n * item.reserve > self.llama.n_ctx):
                self._queue.put_back(item.request.tenant, item)  # waits for rows to finish
                break
            taken.append(item)
            rows += n
            self.cells_reserved += n * item.reserve
        return taken

    def _seqs(self, pending: _Pending) -> list[int]:
        """Free sequence ids for its choices, forgetting the oldest cached prefixes if need be."""
        while len(self._free) < pending.request.params.n and self._cached:
            self._evict_cached()
        return [self._free.popleft() for _ in range(pending.request.params.n)]

    def _evict_cached(self) -> None:
        cached = self._cached.popleft()
        self.llama.forget(cached.seq)
        self._free.append(cached.seq)

    def _iterate(self) -> None:
        """One decode call: every running row's next token, then up to ``prefill_budget`` prompt
        tokens; stream what it yields."""
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
            self._prefilling.remove(job)
            self._start_rows(job, row_logits)
        self._retire_finished()

    def _plan_prefill(self) -> list[tuple[_Prefill, int]]:
        """Chunks of the prompts to prefill this step, in arrival order, within the budget. A
        prompt first takes the longest prefix another sequence of its tenant holds; one that
        shares a longer prefix with a prompt prefilled before it waits for that one."""
        budget, planned = self.prefill_budget, list[tuple[_Prefill, int]]()
        for job in list(self._prefilling):
            if budget <= 0:
                break
            self._share_prefix(job)
            ahead = [j for j, _ in planned if j.pending.request.tenant == job.pending.request.tenant]
            if any(_common(job.prompt, j.prompt) >= job.done + MIN_SHARED for j in ahead):
                continue  # its prefix is being computed: shared next step instead of computed twice
            take = min(len(job.prompt) - job.done, budget)
            budget -= take
            planned.append((job, take))
        return planned

    def _share_prefix(self, job: _Prefill) -> None:
        """Start ``job`` from the longest prefix another sequence of its tenant holds. Looked for
        until it computes its own first chunk (each look compares its prompt with every sequence)."""
        if job.computing or not self.llama.shares_prefixes:
            return
        tenant = job.pending.request.tenant
        sources: list[tuple[int, list[int]]] = [(c.seq, c.tokens) for c in self._cached if c.scope == tenant]
        if self._batch is not None:
            sources += [(r.seq, r.tokens) for r in self._batch.rows if r.pending.request.tenant == tenant]
        sources += [
            (j.seqs[0], j.tokens) for j in self._prefilling if j is not job and j.pending.request.tenant == tenant
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

    def _failed_decode(self, rows: list[_Row], chunks: list[tuple[_Prefill, int]], exc: DecodeError) -> None:
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
            self._prefilling.remove(job)
            self._release(job.seqs, job.pending)
            self._end(job.pending, lambda i: error_delta(i, exc))
        self._retire_finished()

    def _choose(self, batch: _Batch, logits: torch.Tensor) -> None:
        lengths = [len(r.tokens) + 1 for r in batch.rows]
        fresh = sum(1 for r in batch.rows if r.chosen is None)
        chosen = self.streamer.choose(batch.rows, logits, batch.sampling, batch.counts, lengths)
        self.tokens_generated += fresh
        self.peak_rows = max(self.peak_rows, len(batch.rows))
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
            _Row(job.pending, i, self.streamer.new_text(request), seq, list(job.prompt))
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
        """Rows that finished leave the batch; a request's last choice to finish returns its
        cells, and its first choice's sequence stays as a cached prefix."""
        batch = self._batch
        if batch is None:
            return
        keep = [i for i, r in enumerate(batch.rows) if not r.finished]
        gone = [r for r in batch.rows if r.finished]
        batch.keep(keep)
        for row in gone:
            self._retire(row)
        if not batch.rows:
            self._batch = None

    def _retire(self, row: _Row) -> None:
        self.cells_reserved -= row.pending.reserve
        # One choice of a request is kept (its siblings share its prompt and would crowd others out).
        if len(row.tokens) < MIN_SHARED or row.index > 0 or not self.llama.shares_prefixes:
            self.llama.forget(row.seq)
            self._free.append(row.seq)
            return
        self._cached.append(_Cached(row.pending.request.tenant, row.seq, row.tokens))
        while len(self._cached) > CACHED_SEQUENCES or (self._cached and not self._free):
            self._evict_cached()

    def _release(self, seqs: list[int], pending: _Pending) -> None:
        for seq in seqs:
            self.llama.forget(seq)
            self._free.append(seq)
        self.cells_reserved -= len(seqs) * pending.reserve

    def _drop_aborted(self) -> None:
        """Aborted rows and prompts stop here; a request still queued is dropped when taken."""
        if not self._aborted:  # read without the lock: a new abort is seen next iteration
            return
        ids = {r.pending.request.request_id for r in self._batch.rows} if self._batch else set()
        ids |= {j.pending.request.request_id for j in self._prefilling}
        with self._abort_lock:
            gone = self._aborted & ids
            self._aborted -= gone
        for row in self._batch.rows if self._batch else []:
            if row.pending.request.request_id in gone and not row.finished:
                row.finished = True
                row.pending.sink(abort_delta(row.index))
        for job in [j for j in self._prefilling if j.pending.request.request_id in gone]:
            self._prefilling.remove(job)
            self._release(job.seqs, job.pending)
            self._end(job.pending, abort_delta)
        self._retire_finished()

    def _take_abort(self, request_id: str) -> bool:
        with self._abort_lock:
            hit = request_id in self._aborted
            self._aborted.discard(request_id)
        return hit

    @staticmethod
    def _end(pending: _Pending, delta: Callable[[int], GenerationDelta]) -> None:
        for i in range(pending.request.params.n):
            pending.sink(delta(i))


def _common(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x, y = np.asarray(a[:n]), np.asarray(b[:n])
    differ = np.flatnonzero(x != y)
    return int(differ[0]) if len(differ) else n
