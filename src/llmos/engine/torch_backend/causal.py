"""Continuous batching for causal language models on one engine thread.

Each loop iteration admits the requests that are waiting (their prompts are prefilled and
their KV cache merged into the running batch), then advances every running row by one token.
Rows keep their own sampling parameters, stop sequences and stream, and leave the batch the
step they finish or their client goes away, so nobody waits for the slowest request and no
token is computed for a departed client.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from llmos.engine.admission import cache_exceeded
from llmos.engine.choices import Streamer, abort_delta, batch_sampling, eos_ids, error_delta
from llmos.engine.detokenize import IncrementalText
from llmos.engine.protocol import GenerationDelta, GenerationRequest, TokenLogprob
from llmos.engine.threads import IDLE_EXIT_S, enter_compute_thread
from llmos.engine.torch_backend.batch_state import BatchState, forward_kwargs
from llmos.engine.torch_backend.kv_budget import KvBudget
from llmos.engine.torch_backend.kv_cache import cache_argument, truncate
from llmos.engine.torch_backend.lean_decode import LeanDecoder
from llmos.engine.torch_backend.lora_bank import LoraBank
from llmos.engine.torch_backend.prefill import Prefill, prefill_order, run_packed
from llmos.engine.torch_backend.prefix_cache import PrefixCache
from llmos.engine.torch_backend.tenant_share import TenantShare
from llmos.engine.torch_backend.virtual_tokens import (
    States,
    VirtualPrefixes,
    VirtualTokens,
    prefix_states,
    prompt_states,
)
from llmos.kernel.fair_queue import Empty, FairQueue
from llmos.registry.adapters import kv_width

log = logging.getLogger(__name__)
Sink = Callable[[GenerationDelta], None]
_CLOSE = "\0close"  # the queue "tenant" of the sentinel that stops the loop; never a real tenant id


@dataclass
class _Pending:
    request: GenerationRequest
    sink: Sink
    adapter: str | None = None
    """The LoRA adapter (a column range of ``LoraBank``) applied to this request's rows."""
    virtual: VirtualTokens | None = None
    """The prefix- or prompt-tuning adapter whose states go before this request's prompt."""
    reserve: int = 0
    """Cache tokens each of its rows may grow to (see kv_budget)."""

    @property
    def scope(self) -> str:
        """Whose cached prompt states this request may reuse: its tenant's, under the same adapter."""
        adapter = self.adapter or (self.virtual.adapter_id if self.virtual else "")
        return f"{self.request.tenant}\0{adapter}"


@dataclass
class _Row:
    pending: _Pending
    index: int
    text: IncrementalText
    generated: int = 0
    finished: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)
    held_ids: list[int] = field(default_factory=list)
    """Tokens whose text is held back (a partial character or a possible stop sequence)."""
    chosen: int | None = None
    """Its next token when already chosen and streamed: the first, right after its prefill."""


class CausalRunner:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        context_length: int,
        max_batch_size: int = 32,
        batch_wait_s: float = 0.005,
        prefill_budget: int = 256,
        adapter_budget_bytes: int = 512 << 20,
        prefix_cache_bytes: int = 256 << 20,
        kv_cache_bytes: int = 4096 << 20,
        tenant_rows_when_shared: int = 0,
        name: str = "model",
        decode_int8: bool = False,
        native_kernels: bool = True,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.prefill_budget = prefill_budget
        self.name = name
        self.eos_ids = eos_ids((getattr(model, "generation_config", None), model.config), tokenizer)
        self.streamer = Streamer(tokenizer, self.eos_ids, context_length)
        self.cache_name = cache_argument(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.lora = LoraBank(model, adapter_budget_bytes)
        # Decode steps run the lean step where the architecture has one, else the model's forward.
        self.decoder = LeanDecoder.build(model, int8=decode_int8, native=native_kernels)
        self.virtual = VirtualPrefixes(adapter_budget_bytes)
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        width = kv_width(model.config.to_dict()) * next(model.parameters()).element_size()
        self.kv_budget = KvBudget(kv_cache_bytes, width)
        self.kv_bytes = 0  # the running batch's key/value cache, as of the last step
        self.prefill_tokens = 0  # prompt tokens computed (those served from the prefix cache are not)
        self._queue: FairQueue[_Pending | None] = FairQueue()
        self._aborted: set[str] = set()
        self._abort_lock = threading.Lock()
        self._active = 0
        self._closing = False
        self.share = TenantShare(max_batch_size, tenant_rows_when_shared, model.config)
        self._prefilling: deque[Prefill] = deque()
        self.tokens_generated = 0  # every token computed, including for requests later aborted
        self.prefills = 0
        self._prefill_passes = 0  # _advance_prefills calls that computed anything (prefill_order's clock)
        self.peak_rows = 0  # the most rows ever decoded in one step
        self.crashed: BaseException | None = None
        """Why the engine thread died, if it did; its requests are then failed by whoever watches it."""
        self.on_crash: Callable[[BaseException], None] | None = None
        # The engine thread ends after IDLE_EXIT_S with nothing to do and the next request starts
        # another: an idle thread's OpenMP team would slow every other compute thread's (threads.py).
        self._thread_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.threads_started = 0
        self._start_thread()

    def _start_thread(self) -> None:
        """Start the engine thread (``_thread_lock`` held, or before anyone else can submit). If
        it cannot start, the error reaches the caller and the next ``submit`` tries again."""
        thread = threading.Thread(target=self._run, name=f"engine-{self.name}", daemon=True)
        thread.start()
        self._thread = thread
        self.threads_started += 1

    @property
    def adapter_copy_bytes(self) -> int:
        """Memory the lean step holds in copies of the resident adapters' weights, beside the
        bank's own (``lora.used_bytes``): ``A`` rows in its matrices, columns of those in use."""
        if self.decoder is None:
            return 0
        return self.decoder.weights.adapter_bytes + self.decoder.adapters.copy_bytes

    @property
    def adapters_fusing(self) -> bool:
        """Whether the lean step's matrices are being rebuilt for the resident adapters (until
        then adapted rows compute their ``A`` products apart, a little slower)."""
        return self.decoder is not None and self.decoder.fuser is not None and self.decoder.fuser.busy

    # -- called from other threads ---------------------------------------------------------
    def submit(
        self,
        request: GenerationRequest,
        sink: Sink,
        adapter: str | None = None,
        virtual: VirtualTokens | None = None,
    ) -> None:
        """Queue a request; ``adapter`` (acquired from ``self.lora`` by the caller) applies to its
        rows, ``virtual`` tokens go before its prompt. Call ``check_fits`` first."""
        pending = _Pending(request, sink, adapter, virtual, self._reservation(request, virtual))
        with self._thread_lock:
            closed = self._closing
            if not closed:
                self._queue.put(request.tenant, pending)
                if self._thread is None:  # it ended idle: this request starts one
                    self._start_thread()
        if closed:
            self._fail_abort(pending)

    def _reservation(self, request: GenerationRequest, virtual: VirtualTokens | None) -> int:
        lead = virtual.length if virtual else 0
        return min(self.context_length, lead + len(request.prompt_token_ids) + request.params.max_tokens)

    def check_fits(self, request: GenerationRequest, virtual: VirtualTokens | None = None) -> None:
        """Refuse (400) a request that could not fit the key/value cache budget even alone."""
        reserve = self._reservation(request, virtual)
        if not self.kv_budget.fits([reserve] * request.params.n):
            raise cache_exceeded(request.params.n, reserve, self.kv_budget.budget_tokens, self.name, "kv_cache_mb")

    def abort(self, request_id: str) -> None:
        with self._abort_lock:
            self._aborted.add(request_id)

    @property
    def busy(self) -> bool:
        return self._active > 0 or not self._queue.empty() or bool(self._prefilling) or self.share.parked is not None

    def close(self) -> None:
        with self._thread_lock:  # no request starts a thread from now on
            self._closing = True
            thread = self._thread
        self._queue.put(_CLOSE, None)  # wakes a loop waiting for work
        if thread is not None:
            thread.join(timeout=30)
        if thread is None or not thread.is_alive():
            self._abort_queued()
        self._stop_fuser()

    def _abort_queued(self) -> None:
        """End the requests still queued at close (none was admitted, so each gets its abort)."""
        for item in self._queue.drain():
            if item is not None:
                self._fail_abort(item)

    def _stop_fuser(self) -> None:
        """Stop the lean step's helper thread, which holds the model (so that it can be freed)."""
        if self.decoder is not None and self.decoder.fuser is not None:
            self.decoder.fuser.close()

    # -- engine thread ---------------------------------------------------------------------
    def _run(self) -> None:
        """The engine thread. A failed step fails its rows and the loop goes on; anything that
        escapes the loop itself kills the thread, and ``on_crash`` is told so it can fail what
        was in flight and start a fresh runner."""
        try:
            enter_compute_thread()
            self._loop()
        except BaseException as exc:
            log.critical("the engine loop of %s crashed", self.name, exc_info=exc)
            self.crashed = exc
            self._stop_fuser()
            if self.on_crash is not None:
                self.on_crash(exc)

    def _loop(self) -> None:
        """Admit waiting requests between decode steps, prefill at most ``prefill_budget`` prompt
        tokens, then advance every running row by one token.

        Prompts are prefilled in chunks, fewest remaining tokens first (``prefill_order``):
        admitting a crowd, or one very long prompt, delays the running rows by one bounded pause
        per step, not by every newcomer's whole prompt at once.
        """
        state: BatchState[_Row] | None = None
        while not self._closing:
            idle = state is None and not self._prefilling and self.share.parked is None
            held = self.share.held(state)
            for prefilling in self._prefilling:
                held[prefilling.pending.request.tenant] += prefilling.pending.request.params.n
            collected = self._collect(block=idle, running=state, held=held)
            if idle and not collected and not self._closing and self._end_if_idle():
                return
            for pending in collected:
                job = self._start_prefill(pending)
                if job is not None:
                    self._prefilling.append(job)
            for fresh in self._advance_prefills():
                if state is None:
                    state = fresh
                else:
                    state.merge(fresh)
            self.share.drop_finished()
            state = self.share.rebalance(state, self.share.caps(self.share.held(state), self._queue.waiting()))
            if state is None:
                continue
            running = state
            try:
                state = self._step(running)
            except Exception as exc:  # the loop survives; the running requests fail clearly
                log.exception("decoding failed on %s", self.name)
                self._fail_rows([r for r in running.rows if not r.finished], exc)
                state = None
            self.kv_bytes = sum(
                len(b) * b.attention.shape[1] * self.kv_budget.bytes_per_token for b in (state, self.share.parked) if b
            )
            self._active = len(state) if state else 0
        for batch in (state, self.share.parked):
            for row in batch.rows if batch else []:
                if not row.finished:
                    row.pending.sink(abort_delta(row.index))
        for job in self._prefilling:
            self._fail_abort(job.pending)

    def _end_if_idle(self) -> bool:
        """Whether this thread ends now: nothing is queued (a request queued after this check
        starts a new thread, see ``submit``)."""
        with self._thread_lock:
            if not self._queue.empty():
                return False
            self._thread = None
            return True

    def _collect(self, *, block: bool, running: BatchState[_Row] | None, held: Counter[str]) -> list[_Pending]:
        """Requests to admit now: when idle, wait for one and then ``batch_wait`` for company;
        when busy, take only what is already waiting and fits: in rows, in the cache budget and
        in its tenant's share of the batch."""
        reserved = [r.pending.reserve for r in running.rows] if running else []
        reserved += [r.pending.reserve for r in self.share.parked.rows] if self.share.parked else []
        for job in self._prefilling:
            reserved += [job.pending.reserve] * job.pending.request.params.n
        caps = self.share.caps(held, self._queue.waiting())
        full = {t for t, rows in held.items() if rows >= caps.get(t, self.max_batch_size)}
        taken: list[_Pending] = []
        deadline = time.monotonic()
        while len(reserved) < self.max_batch_size:
            try:
                if block and not taken:  # idle: wait for work, ending the thread if none comes
                    item = self._queue.get(timeout=IDLE_EXIT_S, skip=full)
                    deadline = time.monotonic() + self.batch_wait_s  # company is waited for from now
                elif block:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()), skip=full)
                else:
                    item = self._queue.get_nowait(skip=full)
            except Empty:
                break
            if item is None:
                self._closing = True
                break
            if self._take_abort(item.request.request_id, item):
                continue
            tenant, n = item.request.tenant, item.request.params.n
            wanted = reserved + [item.reserve] * n
            if reserved and (len(wanted) > self.max_batch_size or not self.kv_budget.fits(wanted)):
                self._queue.put_back(tenant, item)  # waits for rows to finish
                break
            if held[tenant] and held[tenant] + n > caps.get(tenant, self.max_batch_size):
                self._queue.put_back(tenant, item)  # its tenant has its share; others may still come in
                full.add(tenant)
                continue
            taken.append(item)
            held[tenant] += n
            reserved = wanted
        return taken

    def _fail_abort(self, pending: _Pending) -> None:
        """End every choice of ``pending`` as aborted."""
        for i in range(pending.request.params.n):
            pending.sink(abort_delta(i))

    def _fail(self, pendings: list[_Pending], exc: Exception) -> None:
        for p in pendings:
            for i in range(p.request.params.n):
                p.sink(error_delta(i, exc))

    def _fail_rows(self, rows: list[_Row], exc: Exception) -> None:
        for row in rows:
            row.finished = True
            row.pending.sink(error_delta(row.index, exc))

    def _take_abort(self, request_id: str, pending: _Pending | None = None) -> bool:
        with self._abort_lock:
            hit = request_id in self._aborted
            self._aborted.discard(request_id)
        if hit and pending is not None:
            self._fail_abort(pending)
        return hit

    @torch.inference_mode()
    def _start_prefill(self, pending: _Pending) -> Prefill | None:
        """A prefill job for a newly admitted request (its ``n`` choices share it), starting after
        the longest prefix whose states are cached for its tenant and adapter."""
        try:
            prompt = list(pending.request.prompt_token_ids)
            lead = pending.virtual.length if pending.virtual else 0
            hit = self.prefix_cache.lookup(pending.scope, prompt, lead=lead)
            start, states = hit if hit is not None else (0, self._virtual_states(pending.virtual))
            job = Prefill.start(pending, self.model.config, prompt, lead, start, states)
            job.admitted = self._prefill_passes
            return job
        except Exception as exc:
            log.exception("prefill failed on %s", self.name)
            self._fail([pending], exc)
            return None

    @torch.inference_mode()
    def _advance_prefills(self) -> list[BatchState[_Row]]:
        """Run up to ``prefill_budget`` prompt tokens of the jobs in ``prefill_order``; the finished ones
        become batches of their rows, and stream their first tokens at once. A failure fails only
        the request at fault: a packed pass that fails is rolled back and its prompts are run
        again one by one."""
        budget, planned = self.prefill_budget, []
        for job in prefill_order(self._prefilling, self.prefill_budget):
            if budget <= 0:
                break
            if self._take_abort(job.pending.request.request_id, job.pending):
                self._prefilling.remove(job)
                continue
            take = min(job.remaining, budget)
            budget -= take
            planned.append((job, take))
        # With the lean layers every chunk runs in one packed pass, each token with its prompt's
        # adapter; without them, one pass a prompt through the model's forward.
        passes = [planned] if self.decoder is not None and planned else [[p] for p in planned]
        self._prefill_passes += bool(planned)
        finished = []
        while passes:
            group = passes.pop(0)
            done = [job.done for job, _ in group]
            try:
                if self.decoder is not None:
                    self.lora.prepare([job.pending.adapter for job, take in group for _ in range(take)])
                    run_packed(self.decoder, group, self.lora.context)
                else:
                    job, take = group[0]
                    self.lora.prepare([job.pending.adapter])
                    job.run(self.model, take)
            except Exception as exc:
                log.exception("prefill failed on %s", self.name)
                # A packed pass that failed part-way has written some of its caches: rolled back,
                # its prompts run again one by one, so only the one at fault fails.
                jobs = [(job, d) for (job, _), d in zip(group, done, strict=True)]
                if len(group) > 1 and all(truncate(job.cache, job.lead + d) for job, d in jobs):
                    for job, d in jobs:
                        job.done = d
                    passes[:0] = [[p] for p in group]
                    continue
                for job, _ in group:
                    self._prefilling.remove(job)
                    self._fail([job.pending], exc)
                continue
            self.prefill_tokens += sum(take for _, take in group)
            for job, _ in group:
                if job.remaining == 0:
                    self._prefilling.remove(job)
                    try:
                        fresh = self._to_batch(job)
                        self._first_tokens(fresh)
                    except Exception as exc:
                        log.exception("first token failed on %s", self.name)
                        self._fail([job.pending], exc)
                        continue
                    finished.append(fresh)
        return finished

    def _to_batch(self, job: Prefill) -> BatchState[_Row]:
        pending, request = job.pending, job.pending.request
        rows = [_Row(pending, i, self.streamer.new_text(request)) for i in range(request.params.n)]
        self.prefix_cache.store(pending.scope, job.prompt, job.cache, row=0, lead=job.lead)
        if len(rows) > 1:
            job.cache.batch_repeat_interleave(len(rows))
        assert job.logits is not None
        sampling = batch_sampling(rows)
        logits = job.logits.expand(len(rows), -1).contiguous()
        self.prefills += 1
        return BatchState(
            rows=rows,
            cache=job.cache,
            attention=torch.ones((len(rows), job.lead + len(job.prompt)), dtype=torch.long),
            next_pos=torch.full((len(rows),), job.lead + len(job.prompt)),
            logits=logits,
            sampling=sampling,
            counts=torch.zeros_like(logits) if sampling.uses_penalties else None,
        )

    def _virtual_states(self, virtual: VirtualTokens | None) -> States:
        if virtual is None:
            return []
        if virtual.method == "PREFIX_TUNING":
            return self.virtual.states(virtual, lambda v: prefix_states(v, self.model.config))

        def run_base(tokens: VirtualTokens) -> States:
            self.lora.prepare([None])
            return prompt_states(tokens, self.model)

        return self.virtual.states(virtual, run_base)

    @torch.inference_mode()
    def _choose(self, state: BatchState[_Row]) -> torch.Tensor:
        """Choose each row's next token from ``state.logits`` and stream it; a row whose token was
        chosen already keeps it (and is not streamed twice)."""
        self._drop_aborted(state.rows)
        lengths = (state.next_pos + 1).tolist()
        fresh = sum(1 for r in state.rows if r.chosen is None)
        chosen = self.streamer.choose(state.rows, state.logits, state.sampling, state.counts, lengths)
        self.tokens_generated += fresh
        self.peak_rows = max(self.peak_rows, len(state.rows))
        return chosen

    def _first_tokens(self, fresh: BatchState[_Row]) -> None:
        """Stream the first token of freshly prefilled rows at once, not after the prefills that
        follow theirs in this iteration and the next decode step (its time to first token)."""
        for row, token in zip(fresh.rows, self._choose(fresh).tolist(), strict=True):
            row.chosen = token

    @torch.inference_mode()
    def _step(self, state: BatchState[_Row]) -> BatchState[_Row] | None:
        """Choose each row's next token, stream it, drop finished rows, and compute the next logits."""
        chosen = self._choose(state)
        keep = [i for i, r in enumerate(state.rows) if not r.finished]
        if not keep:
            return None
        tokens = chosen[keep]
        state.select(keep)
        state.attention = torch.cat([state.attention, torch.ones((len(state), 1), dtype=state.attention.dtype)], 1)
        self.lora.prepare([r.pending.adapter for r in state.rows])
        if self.decoder is not None:
            state.logits = self.decoder(tokens, state.next_pos, state.attention, state.cache, self.lora.context)
        else:
            state.logits = self.model(**forward_kwargs(state, tokens, self.cache_name)).logits[:, -1, :].float()
        state.next_pos = state.next_pos + 1
        return state

    def _drop_aborted(self, rows: list[_Row]) -> None:
        ids = {r.pending.request.request_id for r in rows if not r.finished}
        with self._abort_lock:
            gone = ids & self._aborted
            self._aborted -= gone
        for row in rows:
            if row.pending.request.request_id in gone and not row.finished:
                row.finished = True
                row.pending.sink(abort_delta(row.index))
