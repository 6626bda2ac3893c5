"""Continuous batching for causal language models on the torch backend.

The engine loop (``engine.runner``) admits waiting requests between decode steps, by what the
rows take of the key/value budget now; this runner prefills their prompts in chunks (their
key/value states then merged into the running batch) and advances every running row by one
token a step (a single stream by several where its draft is accepted: ``speculative``), within
``step_token_budget`` tokens a step, the decoding rows first. Rows keep
their own sampling parameters, stop sequences and stream, and leave the batch the step they
finish or their client goes away, so nobody waits for the slowest request and no token is
computed for a departed client; rows that outgrow the budget are preempted (``preemption``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch

from llmos.engine.choices import Streamer, batch_sampling, eos_ids
from llmos.engine.config import EngineConfig
from llmos.engine.protocol import FinishReason, GenerationDelta, GenerationRequest
from llmos.engine.runner import GenerationRunner
from llmos.engine.scheduler import RECENT_S, Pending, Row
from llmos.engine.threads import enter_compute_thread, on_compute_thread
from llmos.engine.torch_backend.batch_state import BatchState, forward_kwargs
from llmos.engine.torch_backend.draft_model import DraftModel
from llmos.engine.torch_backend.kv_budget import KvBudget
from llmos.engine.torch_backend.kv_cache import cache_argument, limit_growth, truncate
from llmos.engine.torch_backend.lean_decode import LeanDecoder
from llmos.engine.torch_backend.lora_bank import LoraBank
from llmos.engine.torch_backend.preemption import ADMISSION_HEADROOM, Preemption, held_rows, held_sizes
from llmos.engine.torch_backend.prefill import Prefill, plan_chunks, run_packed
from llmos.engine.torch_backend.prefix_cache import PrefixCache
from llmos.engine.torch_backend.prompt_scores import PromptScores
from llmos.engine.torch_backend.speculative import Speculation
from llmos.engine.torch_backend.tenant_share import TenantShare
from llmos.engine.torch_backend.virtual_tokens import (
    States,
    VirtualPrefixes,
    VirtualTokens,
    prefix_states,
    prompt_states,
)
from llmos.errors import ModelLoadError
from llmos.registry.adapters import kv_width

log = logging.getLogger(__name__)
ROW_VOCAB_BUFFERS = 4
"""Vocabulary-sized float32 buffers a decoding row holds: its logits, its token counts (with
penalties) and the sampler's two working copies (scaled logits, probabilities)."""


class CausalRunner(GenerationRunner):
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        context_length: int,
        config: EngineConfig | None = None,
        name: str = "model",
        draft: DraftModel | None = None,
    ) -> None:
        """``draft``: a smaller model of the family drafting for single streams (``draft_models``)."""
        config = config or EngineConfig()
        # Every decoding row takes a token of a step, and a step keeps one for the prompts: the budget bounds the rows.
        super().__init__(name, config, max(1, config.step_token_budget - 1))
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.prefill_budget = config.prefill_chunk_tokens
        self.step_budget = config.step_token_budget
        self.eos_ids = eos_ids((getattr(model, "generation_config", None), model.config), tokenizer)
        self.streamer = Streamer(tokenizer, self.eos_ids, context_length)
        self.cache_name = cache_argument(model)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.lora = LoraBank(model, config.adapter_memory_bytes)
        # Decode steps run the lean step where the architecture has one, else the model's forward.
        self.decoder = LeanDecoder.build(model, int8=config.decode_int8, native=config.native_kernels)
        if self.decoder is not None:
            on_compute_thread(self.decoder.match_lone_rows)
        self.speculation = Speculation.build(
            config, model, self.decoder, self.streamer, self.cache_name, draft, self._arrived
        )
        probed_out = config.speculative_decoding == "auto" and self.decoder is not None and not self.decoder.int8
        if draft is not None and self.speculation is None and probed_out:
            log.warning("the draft model %s is not used: %s does not speculate on this CPU", draft.name, name)
        elif draft is not None and self.speculation is None:
            raise ModelLoadError(
                f"draft_models gives {name} the draft model {draft.name}, but {name} does not speculate here "
                "(speculative_decoding 'off', int8 decode weights, or under 'auto' no lean layers)"
            )
        self.virtual = VirtualPrefixes(config.adapter_memory_bytes)
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes)
        width = kv_width(model.config.to_dict()) * next(model.parameters()).element_size()
        # Per row beside its cache: float32 logits, token counts and the sampler's working copies.
        vocab = model.config.vocab_size
        self.kv_budget = KvBudget(
            config.kv_cache_bytes,
            width,
            row_overhead_bytes=ROW_VOCAB_BUFFERS * vocab * 4,
            layers=model.config.num_hidden_layers,
        )
        chunk = min(self.prefill_budget, context_length)
        if not self.kv_budget.fits([chunk]):
            need = self.kv_budget.bytes_for([chunk])
            raise ModelLoadError(
                f"kv_cache_mb ({config.kv_cache_bytes / 2**20:g} MiB) cannot hold one prefill chunk of {name} "
                f"({chunk} tokens, prefill_chunk_tokens); set kv_cache_mb to at least {-(-need >> 20)}"
            )
        self.kv_bytes = 0  # the running batch's key/value cache, as of the last step
        self.share = TenantShare(self.scheduler, model.config)
        self.preemption = Preemption(self.kv_budget, self.scheduler)
        self._state: BatchState[Row] | None = None
        self._prefill_jobs: deque[Prefill] = deque()
        self._prefill_passes = 0  # _advance_prefills calls that computed anything (prefill_order's clock)
        self.scoring_step_tokens = config.scoring_step_tokens
        self.scoring_pause_ratio = config.scoring_pause_ratio
        self._generating_at = -math.inf  # when an interactive generating request was last seen here
        self._step_s = 0.0  # how long the last step took: a pause before scoring lasts a multiple of it
        self._scoring_yielded = False  # the last step planned no scoring tokens, scoring prompts waiting

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

    def stats(self) -> dict[str, Any]:
        return super().stats() | {
            "adapters": self.lora.resident() + self.virtual.resident(),
            "adapter_bytes": self.lora.used_bytes,
            "adapter_copy_bytes": self.adapter_copy_bytes,
            "adapters_fusing": self.adapters_fusing,
            "adapter_loads": self.lora.loads,
            "prefix_cache_hits": self.prefix_cache.hits,
            "prefix_tokens_reused": self.prefix_cache.tokens_reused,
            "prefix_cache_bytes": self.prefix_cache.used_bytes,
            "kv_cache_bytes": self.kv_bytes,
            "kv_cache_budget_bytes": self.kv_budget.budget_bytes,
            "preemptions": self.preemption.count,
            **(self.speculation.stats() if self.speculation is not None else {}),
        }

    # -- the scheduler's questions ---------------------------------------------------------
    def _reservation(self, request: GenerationRequest, virtual: VirtualTokens | None) -> int:
        lead = virtual.length if virtual else 0
        return min(self.context_length, lead + len(request.prompt_token_ids) + request.params.max_tokens)

    def _fits(self, reserved: list[int]) -> bool:
        return self.kv_budget.fits(reserved)

    def _admission_size(self, pending: Pending) -> int:
        lead = pending.virtual.length if pending.virtual else 0
        return min(pending.reserve, lead + len(pending.prompt) + ADMISSION_HEADROOM)

    def _reserved(self) -> list[int]:
        """What every held row takes now, with room to grow, at most its reservation (``preemption``)."""
        held = held_rows(self._state, self.share.parked, self._prefill_jobs)
        return [min(pending.reserve, size + ADMISSION_HEADROOM) for pending, size in held]

    @property
    def budget_tokens(self) -> int:
        return self.kv_budget.budget_tokens

    def _rows(self) -> Iterable[Row]:
        for batch in (self._state, self.share.parked):
            if batch is not None:
                yield from batch.rows

    def _prefilling(self) -> Iterable[Pending]:
        return [job.pending for job in self._prefill_jobs]

    def _enter_thread(self) -> None:
        enter_compute_thread()

    def _release(self) -> None:
        """Stop the lean step's helper thread, which holds the model (so that it can be freed)."""
        if self.decoder is not None and self.decoder.fuser is not None:
            self.decoder.fuser.close()

    # -- the engine thread -----------------------------------------------------------------
    def _start(self, pending: Pending) -> None:
        job = self._start_prefill(pending)
        if job is not None:
            self._prefill_jobs.append(job)

    def _cancel_prefill(self, pending: Pending) -> None:
        self._prefill_jobs = deque(job for job in self._prefill_jobs if job.pending is not pending)

    def _rebalance(self, caps: dict[str, int]) -> None:
        self.share.drop_finished()
        self._state = self.share.rebalance(self._state, caps)

    def _execute(self) -> None:
        """One step (``_run_step``), unless it would hold only scoring and a generating request
        arrives in the pause before it (``_pause_for_arrivals``): the loop then admits that one
        first."""
        if not self._note_generating() and self._pause_for_arrivals():
            return
        started = time.perf_counter()
        self._run_step()
        self._step_s = time.perf_counter() - started

    def _run_step(self) -> None:
        """Make room in the key/value budget (preempting the youngest), prefill what the step's
        token budget leaves after its decoding rows, then advance every running row by one token.

        Prompts are prefilled in chunks, fewest remaining tokens first (``prefill_order``):
        admitting a crowd, or one very long prompt, delays the running rows by one bounded pause
        per step, not by every newcomer's whole prompt at once.
        """
        self.preemption.make_room(self._state, self.share.parked, self._prefill_jobs)
        if self._state is not None and not self._state.rows:
            self._state = None
        self.share.drop_finished()  # parked rows preempted, all of them
        for fresh in self._advance_prefills():
            if self._state is None:
                self._state = fresh
            else:
                self._state.merge(fresh)
        running = self._state
        if running is None:
            return
        try:
            self._state = self._step(running)
        except Exception as exc:  # the loop survives; the running requests fail clearly
            log.exception("decoding failed on %s", self.name)
            self._fail_rows([r for r in running.rows if not r.finished], exc)
            self._state = None
        self.kv_bytes = sum(
            len(b) * b.attention.shape[1] * self.kv_budget.bytes_per_token
            for b in (self._state, self.share.parked)
            if b
        )

    @torch.inference_mode()
    def _start_prefill(self, pending: Pending) -> Prefill | None:
        """A prefill job for a newly admitted request (its ``n`` choices share it), starting after
        the longest prefix whose states are cached for its tenant and adapter."""
        try:
            prompt = pending.prompt
            lead = pending.virtual.length if pending.virtual else 0
            k = pending.request.params.prompt_logprobs if pending.resume is None else None  # scored once
            if k is None:
                hit = self.prefix_cache.lookup(pending.scope, prompt, lead=lead)
                start, states = hit if hit is not None else (0, self._virtual_states(pending.virtual))
                job = Prefill.start(pending, self.model.config, prompt, lead, start, states)
            else:  # a scored prompt: every position's logits are scored as its chunks run
                scored = self.prefix_cache.lookup_scored(pending.scope, prompt, k, lead=lead)
                start, states, scores = scored or (0, self._virtual_states(pending.virtual), PromptScores(k))
                job = Prefill.start(pending, self.model.config, prompt, lead, start, states, scores)
            limit_growth(job.cache, lead + len(prompt))  # a prompt's cache holds just the prompt
            job.admitted = self._prefill_passes
            return job
        except Exception as exc:
            log.exception("prefill failed on %s", self.name)
            pending.fail(exc)
            return None

    def _note_generating(self) -> bool:
        """Whether an interactive request that generates is prefilling or decoding now (noted in
        ``_generating_at``)."""
        rows = self._state.rows if self._state is not None else []
        now = any(_generating(job.pending.request) for job in self._prefill_jobs) or any(
            not row.finished and _generating(row.pending.request) for row in rows
        )
        if now:
            self._generating_at = time.monotonic()
        return now

    def _generating_about(self) -> bool:
        """Whether generating work is about: an interactive request that generates was prefilling
        or decoding within ``RECENT_S`` (the moment between a client's answer and its next question
        counts as busy)."""
        return time.monotonic() - self._generating_at < RECENT_S

    def _scoring_tokens(self) -> int | None:
        """What a step gives scoring prompts: ``scoring_step_tokens`` while generating work is
        about, so that an arriving first token waits behind a short step; None (no limit beyond
        the step's) otherwise."""
        return self.scoring_step_tokens if self._generating_about() else None

    def _pause_for_arrivals(self) -> bool:
        """Before a step that would hold only scoring prompts, while generating work is about: stay
        idle for ``scoring_pause_ratio`` times the last step's time, or until a generating request
        is queued; whether one came (or the loop is closing). One queued already was left there
        by admission (no room for it yet): the step runs at once, or neither would ever move.

        Why: a generating request that arrives mid-step is admitted only when the step ends, and
        under scoring traffic steps run back to back, so every arrival found one in flight (about a
        decode step's time, ADR 0026). Idle as long as it computed (ratio 1), the engine is found
        idle half the time and an arrival's mean wait for the step halves. The pause comes before
        the step, not after it: the moment a generating request ends is the moment its client's
        next one is likeliest (a conversation's turns, a harness's items), and a step started then
        would make that request wait for all of it. Scoring beside interactive clients goes at
        1 / (1 + ratio) of its speed; scoring with nothing generating lately never pauses (the
        throughput goal's measure)."""
        if self.scoring_pause_ratio <= 0 or not self._only_scoring() or not self._generating_about():
            return False
        if self.scheduler.queued(_generating):
            return False
        return self.scheduler.wait_for(_generating, self.scoring_pause_ratio * self._step_s)

    def _only_scoring(self) -> bool:
        """Whether all the engine holds is scoring: prompts to score waiting to be prefilled and no
        row decoding for anyone else (a batch's lines neither: the pause is scoring's to take)."""
        rows = self._state.rows if self._state is not None else []
        return (
            bool(self._prefill_jobs)
            and all(job.pending.request.scoring for job in self._prefill_jobs)
            and not any(not row.finished and not row.pending.request.scoring for row in rows)
        )

    @torch.inference_mode()
    def _advance_prefills(self) -> list[BatchState[Row]]:
        """Run up to ``prefill_budget`` prompt tokens of the jobs in ``prefill_order``; the finished ones
        become batches of their rows, and stream their first tokens at once. A failure fails only
        the request at fault: a packed pass that fails is rolled back and its prompts are run
        again one by one."""
        decoding = sum(not row.finished for row in self._state.rows) if self._state is not None else 0
        budget = min(self.prefill_budget, self.step_budget - decoding)
        planned = plan_chunks(
            self._prefill_jobs,
            budget,
            self.prefill_budget,
            self._scoring_tokens(),
            yield_step=not self._scoring_yielded,
        )
        self._scoring_yielded = any(job.pending.request.scoring for job in self._prefill_jobs) and not any(
            job.pending.request.scoring for job, _ in planned
        )
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
                    self._prefill_jobs.remove(job)
                    job.pending.fail(exc)
                continue
            self.prefill_tokens += sum(take for _, take in group)
            for job, _ in group:
                if job.remaining == 0:
                    self._prefill_jobs.remove(job)
                    try:
                        if self._report_scores(job):
                            continue
                        fresh = self._to_batch(job)
                        self._first_tokens(fresh)
                    except Exception as exc:
                        log.exception("first token failed on %s", self.name)
                        job.pending.fail(exc)
                        continue
                    finished.append(fresh)
        return finished

    def _report_scores(self, job: Prefill) -> bool:
        """Send a scored prompt's logprobs to each of its choices; True when that ends the
        request (``max_tokens`` 0: it only scores, and its rows never join the batch)."""
        if job.scores is None:
            return False
        pending = job.pending
        scored = job.scores.entries(job.prompt, self.streamer.decode)
        only = pending.request.params.max_tokens == 0
        if only:
            self.prefix_cache.store(pending.scope, job.prompt, job.cache, row=0, lead=job.lead, scores=job.scores)
        finish = FinishReason.LENGTH if only else None
        for i in range(pending.request.params.n):
            pending.sink(GenerationDelta(index=i, text="", prompt_logprobs=scored, finish_reason=finish))
        return only

    def _to_batch(self, job: Prefill) -> BatchState[Row]:
        pending, request = job.pending, job.pending.request
        assert job.logits is not None
        self.prefills += 1
        if pending.resume is not None:  # a preempted row goes on as it stood (its output is now prompt)
            sampling, counts = pending.resume.saved
            return BatchState(
                rows=[pending.resume.row],
                cache=job.cache,
                attention=torch.ones((1, job.lead + len(job.prompt)), dtype=torch.long),
                next_pos=torch.full((1,), job.lead + len(job.prompt)),
                logits=job.logits,
                sampling=sampling,
                counts=counts,
            )
        rows = [Row(pending, i, self.streamer.new_text(request)) for i in range(request.params.n)]
        self.prefix_cache.store(pending.scope, job.prompt, job.cache, row=0, lead=job.lead, scores=job.scores)
        if len(rows) > 1:
            job.cache.batch_repeat_interleave(len(rows))
        sampling = batch_sampling(rows)
        logits = job.logits.expand(len(rows), -1).contiguous()
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
    def _choose(self, state: BatchState[Row]) -> torch.Tensor:
        """Choose each row's next token from ``state.logits`` and stream it; a row whose token was
        chosen already keeps it (and is not streamed twice)."""
        lengths = (state.next_pos + 1).tolist()
        fresh = sum(1 for r in state.rows if r.chosen is None)
        chosen = self.streamer.choose(state.rows, state.logits, state.sampling, state.counts, lengths)
        self._note_step(len(state.rows), fresh)
        return chosen

    def _first_tokens(self, fresh: BatchState[Row]) -> None:
        """Stream the first token of freshly prefilled rows at once, not after the prefills that
        follow theirs in this iteration and the next decode step (its time to first token)."""
        for row, token in zip(fresh.rows, self._choose(fresh).tolist(), strict=True):
            row.chosen = token

    @torch.inference_mode()
    def _step(self, state: BatchState[Row]) -> BatchState[Row] | None:
        """Choose each row's next token, stream it, drop finished rows, and compute the next logits."""
        chosen = self._choose(state)
        keep = [i for i, r in enumerate(state.rows) if not r.finished]
        if not keep:
            return None
        tokens = chosen[keep]
        state.select(keep)
        # No buffer grows ahead past what the budget allows every held row (``make_room`` saw to one more).
        held = len(held_sizes(state, self.share.parked, self._prefill_jobs))
        limit = min(max(r.pending.reserve for r in state.rows), self.kv_budget.widest(held))
        limit_growth(state.cache, limit)
        self.lora.prepare([r.pending.adapter for r in state.rows])
        self.streamer.prefetch_masks(state.rows)
        # A single stream (nothing else decoding, prefilling, parked or waiting) may speculate.
        alone = len(state) == 1 and not (self._prefill_jobs or self.share.parked) and self.scheduler.queue.empty()
        if self.speculation is not None and alone:
            decode = partial(self._decode, state, tokens)
            self.tokens_generated += self.speculation.step(state, int(tokens[0]), limit, self.lora.context, decode)
        else:
            self._decode(state, tokens)
        return state

    def _arrived(self) -> bool:
        """Whether a request waits to be admitted (asked from within a speculated step)."""
        return not self.scheduler.queue.empty()

    def _decode(self, state: BatchState[Row], tokens: torch.Tensor) -> None:
        """One token of every row of ``state``: its key/value states and the next logits."""
        state.attention = torch.cat([state.attention, torch.ones((len(state), 1), dtype=state.attention.dtype)], 1)
        if self.decoder is not None:
            state.logits = self.decoder(tokens, state.next_pos, state.attention, state.cache, self.lora.context)
        else:
            state.logits = self.model(**forward_kwargs(state, tokens, self.cache_name)).logits[:, -1, :].float()
        state.next_pos = state.next_pos + 1


def _generating(request: GenerationRequest) -> bool:
    """A request someone watches stream: it generates, and is not a batch's line."""
    return not request.scoring and not request.background
