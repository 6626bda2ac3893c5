"""Scheduling by token budget and key/value memory on the torch backend: a step's tokens (its
decoding rows first, then prompt chunks) stay within ``step_token_budget``; rows are admitted by
what they take of the cache now, and when they outgrow it the youngest request is preempted and
prefilled again later, its output unchanged; budgets that could not hold one chunk are refused."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from llmos.config import Settings
from llmos.engine.config import EngineConfig
from llmos.engine.protocol import FinishReason, GenerationRequest, SamplingParams
from llmos.engine.scheduler import Pending, Resume, Row, Scheduler
from llmos.engine.torch_backend.causal import CausalRunner
from llmos.engine.torch_backend.preemption import ADMISSION_HEADROOM, Preemption
from llmos.engine.torch_backend.prefill import Prefill
from llmos.errors import ModelLoadError
from tests.unit.test_scheduler import Sink

PROMPT = [1, 30, 31, 32, 33]


@pytest.fixture
def build(tiny_chat_dir: Path) -> Iterator[Any]:
    made: list[CausalRunner] = []

    def runner(**options: Any) -> CausalRunner:
        model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
        with torch.no_grad():  # the random model's logits are nearly flat: sharpened, each token depends on its context
            model.model.embed_tokens.weight.mul_(8.0)  # (tied to the output layer)
        config = EngineConfig(**{"threads": 1, "batch_wait_s": 0.2, **options})
        made.append(
            CausalRunner(model, AutoTokenizer.from_pretrained(tiny_chat_dir), context_length=256, config=config)
        )
        return made[-1]

    yield runner
    for r in made:
        r.close()


def run(runner: CausalRunner, requests: list[tuple[str, SamplingParams]], *prompts: list[int]) -> list[Sink]:
    """Submit every request at once (admitted together within the batch wait), each with its
    prompt (``PROMPT`` by default), and wait for them."""
    sinks = []
    for i, (rid, params) in enumerate(requests):
        request = GenerationRequest(rid, "tiny", prompts[i] if prompts else PROMPT, params)
        runner.check_fits(request)
        sinks.append(Sink(params.n))
        runner.submit(request, sinks[-1])
    return [sink.wait() for sink in sinks]


def choices(sink: Sink) -> list[list[int]]:
    by_index: dict[int, list[int]] = {}
    for delta in sink.deltas:
        by_index.setdefault(delta.index, []).extend(delta.token_ids)
    return [by_index[i] for i in sorted(by_index)]


class CountingDecoder:
    """The lean decoder, counting the tokens each engine iteration computes (decode rows and prompt chunks)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.tokens = 0

    def __call__(self, tokens: torch.Tensor, *args: Any) -> Any:
        self.tokens += len(tokens)
        return self.inner(tokens, *args)

    def prefill(self, chunks: list[Any], lora: Any, every: Any) -> Any:
        self.tokens += sum(len(chunk) for chunk, _, _ in chunks)
        return self.inner.prefill(chunks, lora, every=every)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_step_decodes_its_rows_first_and_fills_the_rest_of_its_budget_with_prompt_chunks(build: Any) -> None:
    runner = build(step_token_budget=12, prefill_chunk_tokens=8, max_batch_size=2, prefix_cache_bytes=0)
    assert runner.decoder is not None
    counting = CountingDecoder(runner.decoder)
    runner.decoder = counting
    steps: list[int] = []
    execute = runner._execute

    def recording() -> None:
        counting.tokens = 0
        execute()
        steps.append(counting.tokens)

    runner._execute = recording
    # Six short prompts and a long one together: the short ones, first, decode while the long one is prefilled.
    shorts = [[1, 30 + i, 31, 32, 33] for i in range(6)]
    long_prompt = list(range(40, 140))
    requests = [(f"s{i}", SamplingParams(max_tokens=40, temperature=0.0)) for i in range(6)]
    sinks = run(runner, [*requests, ("long", SamplingParams(max_tokens=4, temperature=0.0))], *shorts, long_prompt)
    assert all(sink.finish == FinishReason.LENGTH for sink in sinks)
    assert max(steps) <= 12  # never more than the budget, decoding rows and chunks together
    assert steps.count(12) >= len(long_prompt) // 8  # and filled: six rows decoding, six prompt tokens
    assert runner.peak_rows == 7 > runner.config.max_batch_size  # admitted by memory and budget, no row cap
    assert runner.prefill_tokens == 6 * 5 + len(long_prompt)


@pytest.mark.slow  # about 25 s on a loaded machine; preemption and recompute are covered fast by the crowd test below
def test_rows_that_outgrow_the_budget_preempt_the_youngest_which_resumes_where_it_stood(build: Any) -> None:
    runner = build()
    older = SamplingParams(max_tokens=70, temperature=0.0)
    younger = SamplingParams(max_tokens=70, temperature=1.0, seed=5, n=2, presence_penalty=0.5)
    alone = [choices(sink) for sink in run(runner, [("a", older)]) + run(runner, [("b", younger)])]
    reserve = len(PROMPT) + 70
    runner.kv_budget.budget_bytes = runner.kv_budget.bytes_for([reserve] * 2)  # "b" fits alone, no more
    assert not runner.kv_budget.fits([reserve] * 3)  # the three rows start together, but cannot all finish
    runner.peak_rows = 0
    together = run(runner, [("a", older), ("b", younger)])
    assert runner.peak_rows == 3  # admitted by what they took, not what they might take
    assert runner.preemption.count >= 1
    assert [choices(sink) for sink in together] == alone  # recomputed: the same tokens and seeded draws
    for sink in together:
        assert [d.finish_reason for d in sink.deltas if d.finish_reason] == [FinishReason.LENGTH] * len(choices(sink))
    assert runner.stats()["preemptions"] == runner.preemption.count


def _job(rid: str, queued_at: float, background: bool = False) -> Prefill:
    request = GenerationRequest(rid, "m", [1, 2], SamplingParams(), background=background)
    pending = Pending(request, lambda delta: None, reserve=10, queued_at=queued_at)
    return Prefill(pending=pending, prompt=[1, 2], lead=0, cache=DynamicCache(), done=0)


def test_the_youngest_is_preempted_background_lines_first_and_never_the_last_request() -> None:
    jobs = deque([_job("old", 1.0), _job("new", 2.0)])
    assert Preemption._youngest(None, None, jobs) == "new"
    jobs.append(_job("batch-line", 0.5, background=True))
    assert Preemption._youngest(None, None, jobs) == "batch-line"  # background work gives way first
    assert Preemption._youngest(None, None, deque([_job("alone", 1.0)])) is None


def test_an_abort_ends_a_preempted_row_while_queued_and_its_rows_still_held() -> None:
    scheduler = Scheduler(max_rows=8, batch_wait_s=0, light_rows=0)
    ended = Sink(2)
    request = GenerationRequest("x", "m", [1], SamplingParams(n=2))
    pending = Pending(request, ended, reserve=10)
    queued = Row(pending, 1, text=None)  # type: ignore[arg-type]
    scheduler.queue.put_back("", Pending(request, ended, 10, resume=Resume(queued, None)))
    scheduler.abort("x")
    assert scheduler.take_aborted(lambda: ["x"]) == {"x"}  # choice 0 is held: the runner ends it
    assert [(d.index, d.finish_reason) for d in ended.deltas] == [(1, FinishReason.ABORT)]
    assert scheduler.queue.empty() and scheduler.take_aborted(lambda: ["x"]) == set()  # forgotten


def test_budgets_too_small_for_one_prompt_chunk_are_refused_at_start_up(build: Any) -> None:
    with pytest.raises(ValidationError, match=r"step_token_budget \(256\) must exceed prefill_chunk_tokens"):
        Settings(step_token_budget=256, prefill_chunk_tokens=256)
    assert Settings(step_token_budget=257, prefill_chunk_tokens=256).step_token_budget == 257
    with pytest.raises(ModelLoadError, match=r"kv_cache_mb .* cannot hold one prefill chunk") as caught:
        build(kv_cache_bytes=64 << 10)
    need = int(str(caught.value).rsplit(" ", 1)[-1])
    assert build(kv_cache_bytes=need << 20).kv_budget.fits([256])  # the size it names is enough


def test_a_crowd_in_a_budget_for_two_all_finishes_with_what_each_generates_alone(build: Any) -> None:
    runner = build(prefix_cache_bytes=0)
    params = SamplingParams(max_tokens=40, temperature=1.0, seed=11)  # every token drawn from its context
    alone = run(runner, [("alone", params)])[0].tokens
    reserve = len(PROMPT) + 40
    # Three are admitted at their prompts' size, two of them can finish together, not three.
    runner.kv_budget.budget_bytes = runner.kv_budget.bytes_for([len(PROMPT) + ADMISSION_HEADROOM] * 3)
    assert runner.kv_budget.fits([reserve] * 2) and not runner.kv_budget.fits([reserve] * 3)
    runner.peak_rows = 0
    sinks = run(runner, [(f"r{i}", params) for i in range(3)])
    assert runner.peak_rows == 3 and runner.preemption.count >= 1
    assert all(sink.finish == FinishReason.LENGTH and sink.tokens == alone for sink in sinks)
