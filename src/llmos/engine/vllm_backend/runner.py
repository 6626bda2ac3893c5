"""A chat model served by vLLM on a GPU, driven by the shared engine loop.

The loop (``engine.runner``) admits requests from the fair queue within each tenant's share, as
for every backend; this runner hands each admitted request to vLLM's ``LLMEngine``
(``add_request`` with the prompt's token ids, the mapped sampling parameters and, for an adapter,
a ``LoRARequest``), and each iteration's ``step()`` (vLLM's own continuous batching, paged
key/value cache and preemption) comes back as deltas (``RequestOutputKind.DELTA``) streamed to
the rows. Aborts go to ``abort_request``. vLLM cannot hold a running request back, so rows are
never parked: tenant shares bind at admission only. Every vllm object reaches this module
through ``VllmApi``, built by the backend when it loads a model, so nothing here imports vllm.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmos.engine.detokenize import IncrementalText
from llmos.engine.protocol import FinishReason, GenerationDelta, GenerationRequest, PromptLogprob
from llmos.engine.runner import GenerationRunner
from llmos.engine.scheduler import Pending, Row
from llmos.engine.vllm_backend.mapping import (
    finish_reason,
    prompt_logprobs,
    refuse_unsupported,
    sampling_kwargs,
    token_logprobs,
)
from llmos.errors import EngineError, InvalidRequestError
from llmos.registry.adapters import adapter_rank, read_adapter_config

log = logging.getLogger(__name__)
VLLM_ROWS = 256
"""Sequences vLLM schedules at once (its ``max_num_seqs``), and the rows the loop admits."""


@dataclass(frozen=True)
class VllmApi:
    """The vllm classes this runner builds requests with (``vllm.SamplingParams``,
    ``vllm.lora.request.LoRARequest``, ``RequestOutputKind.DELTA``)."""

    sampling_params: Callable[..., Any]
    lora_request: Callable[..., Any]
    delta: Any


class VllmRunner(GenerationRunner):
    cache_setting = "the model's context length"

    def __init__(
        self,
        engine: Any,
        api: VllmApi,
        tokenizer: Any,
        *,
        name: str,
        config: Any,
        context_length: int,
        adapter_dir: Callable[[str], Path],
    ) -> None:
        """``engine``: a ``vllm.LLMEngine`` serving the model; ``adapter_dir(adapter_id)``: where a
        LoRA adapter's PEFT files are (read by vLLM at its first request)."""
        super().__init__(name, config, VLLM_ROWS)
        self.engine = engine
        self.api = api
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.adapter_dir = adapter_dir
        self._requests: dict[str, list[Row]] = {}  # request id -> its choices' rows
        self._scored: dict[str, tuple[PromptLogprob, ...]] = {}  # request id -> its scored prompt
        self._unopened: dict[str, set[int]] = {}  # request id -> choices whose first delta is not sent yet
        self._loras: dict[str, Any] = {}  # adapter id -> its LoRARequest (vLLM keys adapters by int id)
        self._ranks: dict[str, int] = {}  # adapter id -> its largest LoRA rank (checked before it is used)

    # -- admission -------------------------------------------------------------------------
    def check_fits(self, request: GenerationRequest, virtual: Any = None) -> None:
        refuse_unsupported(request)
        super().check_fits(request, virtual)

    def _reservation(self, request: GenerationRequest, virtual: Any) -> int:
        return len(request.prompt_token_ids) + request.params.max_tokens

    def _fits(self, reserved: list[int]) -> bool:
        """vLLM allocates and preempts its paged cache itself: the loop only keeps within its rows
        and each sequence within the model's context."""
        return len(reserved) <= self.max_batch_size and all(r <= self.context_length for r in reserved)

    @property
    def budget_tokens(self) -> int:
        return self.context_length

    # -- the loop's hooks ------------------------------------------------------------------
    def _rows(self) -> Iterable[Row]:
        return [row for rows in self._requests.values() for row in rows if not row.finished]

    def _prefilling(self) -> Iterable[Pending]:
        return ()  # vLLM prefills inside its step: an admitted request is running at once

    def _start(self, pending: Pending) -> None:
        request = pending.request
        try:
            params = self.api.sampling_params(**sampling_kwargs(request.params), output_kind=self.api.delta)
            lora = self._lora(pending.adapter) if pending.adapter is not None else None
            prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
            self.engine.add_request(request.request_id, prompt, params, lora_request=lora)
        except Exception as exc:  # vLLM's refusal of this request's inputs fails it alone
            pending.fail(exc)
            return
        text = IncrementalText(self._decode)
        self._requests[request.request_id] = [Row(pending, i, text) for i in range(request.params.n)]

    def _cancel_prefill(self, pending: Pending) -> None:
        """Never called: nothing is ever prefilling here (``_prefilling``)."""

    def _drop(self, gone: set[str]) -> None:
        ours = [request_id for request_id in gone if request_id in self._requests]
        if ours:
            self.engine.abort_request(ours)
        super()._drop(gone)
        for request_id in ours:
            self._forget(request_id)

    def _rebalance(self, caps: dict[str, int]) -> None:
        """Nothing: vLLM cannot pause a running request, so tenant caps act at admission only."""

    def _execute(self) -> None:
        if not self._requests:
            return
        if not self.engine.has_unfinished_requests():  # step() would wait for output that never comes
            lost = list(self._requests)
            self._fail_rows(self._rows(), EngineError("vLLM no longer holds these requests"))
            for request_id in lost:
                self._forget(request_id)
            return
        # A step is the whole batch in vLLM's engine core: its failure (EngineDeadError after an
        # out-of-memory or a CUDA fault) is no one request's fault and leaves the core unusable, so it
        # escapes the loop, which crashes and is reloaded (engine.crash) with every request failed.
        outputs = self.engine.step()
        fresh = 0
        for output in outputs:
            rows = self._requests.get(output.request_id)
            if rows is None:  # aborted since vLLM computed it
                continue
            fresh += self._deliver(rows, output)
            if all(row.finished for row in rows):
                self._forget(output.request_id)
        self._note_step(sum(1 for _ in self._rows()), fresh)

    def _enter_thread(self) -> None:
        """Nothing: vLLM computes in its own engine-core process."""

    def _release(self) -> None:
        """Stop vLLM's engine core, which gives its GPU memory back."""
        core = getattr(self.engine, "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if shutdown is not None:
            with contextlib.suppress(Exception):
                shutdown()

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "backend": "vllm", "adapters": list(self._loras)}

    # -- what vLLM gave back ---------------------------------------------------------------
    def _deliver(self, rows: list[Row], output: Any) -> int:
        """Stream one ``RequestOutput``'s new text to its rows; the number of tokens it brought."""
        request = rows[0].pending.request
        params = request.params
        request_id = request.request_id
        if request_id not in self._scored:  # its first output: its prompt was just prefilled
            self.prefills += 1
            self.prefill_tokens += len(request.prompt_token_ids) - int(getattr(output, "num_cached_tokens", 0) or 0)
            scores: tuple[PromptLogprob, ...] = ()
            if params.prompt_logprobs is not None and output.prompt_logprobs is not None:
                first = self._decode([request.prompt_token_ids[0]])
                scores = prompt_logprobs(
                    request.prompt_token_ids, output.prompt_logprobs, params.prompt_logprobs, first
                )
            self._scored[request_id] = scores
            self._unopened[request_id] = {row.index for row in rows}
        fresh = 0
        for completion in output.outputs:
            row = rows[completion.index]
            if row.finished:
                continue
            ids = tuple(completion.token_ids)
            text = completion.text
            logprobs = token_logprobs(ids, completion.logprobs, params.top_logprobs) if params.logprobs else ()
            finish = finish_reason(completion.finish_reason)
            if params.max_tokens == 0:  # it only scored its prompt: the one token vLLM had to make is dropped
                ids, text, logprobs = (), "", ()
                finish = FinishReason.LENGTH if finish is not None else None
            scored = self._scored[request_id] if row.index in self._unopened[request_id] else ()
            if not (ids or text or finish or scored):
                continue
            self._unopened[request_id].discard(row.index)
            row.generated += len(ids)
            fresh += len(ids)
            delta = GenerationDelta(
                index=row.index,
                text=text,
                token_ids=ids,
                logprobs=logprobs,
                finish_reason=finish,
                prompt_logprobs=scored,
            )
            if finish is not None:
                row.end(delta)
            else:
                row.pending.sink(delta)
        return fresh

    def check_adapter(self, adapter_id: str) -> None:
        """Refuse (400) an adapter of a rank over ``vllm_max_lora_rank``: vLLM would only find out
        inside its engine core's worker, at the step that loads it, which kills the core."""
        if adapter_id in self._ranks:
            rank = self._ranks[adapter_id]
        else:
            rank = self._ranks[adapter_id] = adapter_rank(read_adapter_config(self.adapter_dir(adapter_id)))
        limit = self.config.vllm_max_lora_rank
        if rank > limit:
            raise InvalidRequestError(
                f"the adapter {adapter_id} has LoRA rank {rank}, over the {limit} vLLM serves "
                f"{self.name} with (vllm_max_lora_rank)",
                param="model",
            )

    def _lora(self, adapter_id: str) -> Any:
        lora = self._loras.get(adapter_id)
        if lora is None:
            lora = self.api.lora_request(
                lora_name=adapter_id, lora_int_id=len(self._loras) + 1, lora_path=str(self.adapter_dir(adapter_id))
            )
            self._loras[adapter_id] = lora
        return lora

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._scored.pop(request_id, None)
        self._unopened.pop(request_id, None)

    def _decode(self, ids: Any) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))
