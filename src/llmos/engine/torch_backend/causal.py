"""Batched generation for causal language models on one engine thread.

Requests that arrive together (within ``batch_wait``) are decoded as one left-padded batch
with a shared KV cache; each row keeps its own sampling parameters, stop sequences and
stream. Finished or aborted rows leave the batch at the next step, so no token is computed
for a client that has gone. (Iteration-level admission of new requests is the next step.)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from llmos.engine.detokenize import IncrementalText
from llmos.engine.protocol import (
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    TokenLogprob,
    TopLogprob,
)
from llmos.engine.sampling import BatchSampling, apply_penalties, select_tokens, token_logprobs

log = logging.getLogger(__name__)
Sink = Callable[[GenerationDelta], None]


@dataclass
class _Pending:
    request: GenerationRequest
    sink: Sink


@dataclass
class _Row:
    pending: _Pending
    index: int
    text: IncrementalText
    generated: int = 0
    finished: bool = False
    logprobs: list[TokenLogprob] = field(default_factory=list)


class CausalRunner:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        context_length: int,
        max_batch_size: int = 32,
        batch_wait_s: float = 0.005,
        name: str = "model",
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.name = name
        self.eos_ids = _eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._aborted: set[str] = set()
        self._abort_lock = threading.Lock()
        self._active = 0
        self.tokens_generated = 0  # every token computed, including for requests later aborted
        self.batches_run = 0
        self._thread = threading.Thread(target=self._loop, name=f"engine-{name}", daemon=True)
        self._thread.start()

    # -- called from other threads ---------------------------------------------------------
    def submit(self, request: GenerationRequest, sink: Sink) -> None:
        self._queue.put(_Pending(request, sink))

    def abort(self, request_id: str) -> None:
        with self._abort_lock:
            self._aborted.add(request_id)

    @property
    def busy(self) -> bool:
        return self._active > 0 or not self._queue.empty()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            rows = first.request.params.n
            deadline = time.monotonic() + self.batch_wait_s
            while rows < self.max_batch_size:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
                rows += item.request.params.n
            batch = [p for p in batch if not self._take_abort(p.request.request_id, p)]
            if not batch:
                continue
            self._active = len(batch)
            self.batches_run += 1
            try:
                self._run_batch(batch)
            except Exception as exc:  # the loop survives; the batch's requests fail clearly
                log.exception("generation failed on %s", self.name)
                for p in batch:
                    for i in range(p.request.params.n):
                        p.sink(
                            GenerationDelta(
                                index=i,
                                text="",
                                finish_reason=FinishReason.ERROR,
                                error=f"generation failed: {type(exc).__name__}: {exc}",
                            )
                        )
            finally:
                self._active = 0

    def _take_abort(self, request_id: str, pending: _Pending | None = None) -> bool:
        with self._abort_lock:
            hit = request_id in self._aborted
            self._aborted.discard(request_id)
        if hit and pending is not None:
            for i in range(pending.request.params.n):
                pending.sink(GenerationDelta(index=i, text="", finish_reason=FinishReason.ABORT))
        return hit

    @torch.inference_mode()
    def _run_batch(self, batch: list[_Pending]) -> None:
        rows = [
            _Row(p, i, IncrementalText(self._decode, p.request.params.stop))
            for p in batch
            for i in range(p.request.params.n)
        ]
        prompts = [list(r.pending.request.prompt_token_ids) for r in rows]
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            input_ids[i, width - len(prompt) :] = torch.tensor(prompt)
            attention[i, width - len(prompt) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        sampling = _batch_sampling(rows)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1, :].float()
        counts = torch.zeros_like(logits) if sampling.uses_penalties else None
        next_pos = positions[:, -1] + 1
        while True:
            self._drop_aborted(rows)
            if counts is not None:
                logits = apply_penalties(logits, counts, sampling.presence, sampling.frequency)
            chosen = select_tokens(logits, sampling)
            want_k = max(
                (r.pending.request.params.top_logprobs for r in rows if r.pending.request.params.logprobs), default=-1
            )
            lp = token_logprobs(logits, chosen, want_k) if want_k >= 0 else None
            if counts is not None:
                counts.scatter_add_(1, chosen[:, None], torch.ones_like(chosen[:, None], dtype=counts.dtype))
            self.tokens_generated += len(rows)
            for i, (row, token) in enumerate(zip(rows, chosen.tolist(), strict=True)):
                if not row.finished:
                    self._advance(row, token, int(next_pos[i]) + 1, lp, i)
            keep = torch.tensor([not r.finished for r in rows])
            if not bool(keep.any()):
                return
            if not bool(keep.all()):
                idx = torch.nonzero(keep).flatten()
                cache.batch_select_indices(idx)
                rows = [rows[j] for j in idx.tolist()]
                chosen, attention, next_pos = chosen[idx], attention[idx], next_pos[idx]
                sampling = sampling.select(idx)
                counts = counts[idx] if counts is not None else None
            attention = torch.cat([attention, torch.ones((len(rows), 1), dtype=attention.dtype)], dim=1)
            out = self.model(
                input_ids=chosen[:, None],
                attention_mask=attention,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :].float()
            next_pos = next_pos + 1

    def _drop_aborted(self, rows: list[_Row]) -> None:
        ids = {r.pending.request.request_id for r in rows if not r.finished}
        with self._abort_lock:
            gone = ids & self._aborted
            self._aborted -= gone
        for row in rows:
            if row.pending.request.request_id in gone and not row.finished:
                row.finished = True
                row.pending.sink(GenerationDelta(index=row.index, text="", finish_reason=FinishReason.ABORT))

    def _advance(self, row: _Row, token: int, total_len: int, lp: Any, i: int) -> None:
        params = row.pending.request.params
        row.generated += 1
        finish: FinishReason | None = None
        if token in self.eos_ids:
            finish = FinishReason.STOP
            text = row.text.flush()
        else:
            text = row.text.push(token)
            if row.text.stopped:
                finish = FinishReason.STOP
            elif row.generated >= params.max_tokens or total_len >= self.context_length:
                finish = FinishReason.LENGTH
                text += row.text.flush()
        logprobs: tuple[TokenLogprob, ...] = ()
        if lp is not None and params.logprobs:
            logprobs = (self._logprob_entry(token, lp, i, params.top_logprobs),)
        row.finished = finish is not None
        emitted_ids = () if token in self.eos_ids else (token,)
        if text or finish or logprobs:
            row.pending.sink(
                GenerationDelta(
                    index=row.index, text=text, token_ids=emitted_ids, logprobs=logprobs, finish_reason=finish
                )
            )

    def _logprob_entry(self, token: int, lp: Any, i: int, k: int) -> TokenLogprob:
        chosen_lp, top_vals, top_idx = lp
        piece = self._decode([token])
        top = [
            TopLogprob(token=(t := self._decode([tid])), logprob=float(v), bytes=list(t.encode()))
            for v, tid in zip(top_vals[i, :k].tolist(), top_idx[i, :k].tolist(), strict=True)
        ]
        return TokenLogprob(token=piece, logprob=float(chosen_lp[i]), bytes=list(piece.encode()), top_logprobs=top)

    def _decode(self, ids: Any) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def _batch_sampling(rows: list[_Row]) -> BatchSampling:
    def col(attr: str) -> torch.Tensor:
        return torch.tensor([float(getattr(r.pending.request.params, attr)) for r in rows])

    generators: list[torch.Generator | None] = []
    for r in rows:
        seed = r.pending.request.params.seed
        generators.append(torch.Generator().manual_seed(seed + r.index) if seed is not None else None)
    return BatchSampling(
        temperature=col("temperature"),
        top_p=col("top_p"),
        presence=col("presence_penalty"),
        frequency=col("frequency_penalty"),
        generators=generators,
    )


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
