"""A freshly prefilled request streams its first token at once, before the prompts admitted with it
are prefilled, and what it generates does not depend on that (same tokens, same seeded samples)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from llmos.engine.config import EngineConfig
from llmos.engine.protocol import GenerationDelta, GenerationRequest, SamplingParams
from llmos.engine.sampling import draw_one
from llmos.engine.torch_backend import causal, prefill
from llmos.engine.torch_backend.causal import CausalRunner

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14], [15, 16, 17], [18, 19, 20, 21, 22]]


def _generate(
    runner: CausalRunner,
    requests: list[tuple[list[int], SamplingParams]],
    events: list[tuple[str, str]],
    finishes: dict[str, str] | None = None,
) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    done = threading.Semaphore(0)

    def sink_for(rid: str):  # type: ignore[no-untyped-def]
        def sink(delta: GenerationDelta) -> None:
            if rid not in tokens:
                events.append(("first token", rid))
            tokens.setdefault(rid, []).extend(delta.token_ids)
            if delta.finish_reason is not None:
                if finishes is not None:
                    finishes[rid] = str(delta.finish_reason)
                done.release()

        return sink

    for i, (prompt, params) in enumerate(requests):  # queued before the loop wakes: admitted in one iteration
        runner.submit(GenerationRequest(f"r{i}", "m", prompt, params), sink_for(f"r{i}"))
    for _ in requests:
        assert done.acquire(timeout=60)
    return tokens


def _runner(tiny_chat_dir: Path, prefill_chunk_tokens: int = 256) -> CausalRunner:
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    # A long batch wait: every request submitted together is admitted together.
    config = EngineConfig(batch_wait_s=0.5, prefill_chunk_tokens=prefill_chunk_tokens)
    return CausalRunner(model, AutoTokenizer.from_pretrained(tiny_chat_dir), context_length=128, config=config)


@pytest.fixture
def runner(tiny_chat_dir: Path) -> Iterator[CausalRunner]:
    out = _runner(tiny_chat_dir)
    yield out
    out.close()


def test_first_tokens_stream_right_after_each_prefill(tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, str]] = []
    packed = causal.run_packed

    def recording(decoder: object, planned: list[tuple[prefill.Prefill, int]], lora: object = None) -> None:
        packed(decoder, planned, lora)
        events.extend(("prefilled", job.pending.request.request_id) for job, _ in planned if job.remaining == 0)

    monkeypatch.setattr(causal, "run_packed", recording)
    runner = _runner(tiny_chat_dir, prefill_chunk_tokens=5)  # 4 + 6 + 3 + 5 prompt tokens: four passes
    try:
        _generate(runner, [(p, SamplingParams(max_tokens=6, temperature=0.0)) for p in PROMPTS], events)
    finally:
        runner.close()
    prefilled = [rid for kind, rid in events if kind == "prefilled"]
    assert prefilled == ["r2", "r0", "r3", "r1"]  # fewest prompt tokens first (prefill_order)
    for rid in prefilled:  # each first token streams before the next prompt's prefill ends
        assert events[events.index(("prefilled", rid)) + 1] == ("first token", rid)


def _job(tokens: int, admitted: int) -> prefill.Prefill:
    return prefill.Prefill(pending=None, prompt=[0] * tokens, lead=0, cache=DynamicCache(), done=0, admitted=admitted)


def test_prefill_order_is_shortest_first_and_no_prompt_starves() -> None:
    long, first, second = _job(300, 0), _job(40, 0), _job(40, 0)
    assert prefill.prefill_order([long, first, second], 100) == [first, second, long]  # ties: arrival order
    # Later arrivals overtake a long prompt only while it has waited fewer passes than its
    # remaining tokens fill: at a 100-token budget, 300 tokens are overtaken by prompts admitted
    # in the next two passes, not by later ones.
    assert prefill.prefill_order([long, _job(10, 2)], 100)[0] is not long
    assert prefill.prefill_order([long, _job(10, 3)], 100)[0] is long
    long.done = 250  # a chunk done: what remains counts
    assert prefill.prefill_order([long, _job(10, 0)], 100)[0] is not long
    assert prefill.prefill_order([long, _job(60, 0)], 100)[0] is long


def test_a_burst_generates_what_each_request_generates_alone(runner: CausalRunner) -> None:
    params = [
        SamplingParams(max_tokens=8, temperature=0.0),
        SamplingParams(max_tokens=8, temperature=1.0, seed=3),
        SamplingParams(max_tokens=8, temperature=0.8, seed=5, presence_penalty=1.0),
        SamplingParams(max_tokens=8, temperature=1.0, seed=7, logprobs=True, top_logprobs=2),
    ]
    together = _generate(runner, list(zip(PROMPTS, params, strict=True)), [])
    for i, (prompt, p) in enumerate(zip(PROMPTS, params, strict=True)):
        assert _generate(runner, [(prompt, p)], [])["r0"] == together[f"r{i}"]


def test_a_seeded_request_draws_once_per_token(runner: CausalRunner) -> None:
    """The first token is drawn right after the prefill, and not drawn again at the next step."""
    prompt, seed = PROMPTS[1], 3
    got = _generate(runner, [(prompt, SamplingParams(max_tokens=8, temperature=1.0, seed=seed))], [])["r0"]
    generator = torch.Generator().manual_seed(seed)  # choice 0's generator, as the engine seeds it
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(len(got)):
            logits = runner.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            token = draw_one(torch.softmax(logits, dim=-1), generator)
            expected.append(token)
            ids.append(token)
    assert got == expected


def test_prompts_admitted_together_are_prefilled_in_one_pass(
    tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[int] = []
    packed = causal.run_packed

    def recording(decoder: object, planned: list[tuple[prefill.Prefill, int]], lora: object = None) -> None:
        passes.append(len(planned))
        packed(decoder, planned, lora)

    monkeypatch.setattr(causal, "run_packed", recording)
    runner = _runner(tiny_chat_dir)
    try:
        _generate(runner, [(p, SamplingParams(max_tokens=3)) for p in PROMPTS], [])
    finally:
        runner.close()
    assert passes == [len(PROMPTS)]


def test_a_failing_prompt_fails_alone_and_the_others_of_its_pass_go_on(
    tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packed prefill pass that fails after writing its caches is rolled back and its prompts run
    again one by one: the one at fault fails, the others generate what they generate alone."""
    bad = 77
    passes: list[int] = []
    packed = causal.run_packed

    def failing(decoder: object, planned: list[tuple[prefill.Prefill, int]], lora: object = None) -> None:
        passes.append(len(planned))
        packed(decoder, planned, lora)  # every cache of the pass written, every job advanced
        if any(bad in job.prompt for job, _ in planned):
            raise RuntimeError("a fault in one prompt")

    monkeypatch.setattr(causal, "run_packed", failing)
    runner = _runner(tiny_chat_dir)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    try:
        finishes: dict[str, str] = {}
        together = _generate(runner, [(PROMPTS[0], greedy), ([bad, 5, 6], greedy), (PROMPTS[2], greedy)], [], finishes)
        alone = [_generate(runner, [(p, greedy)], [])["r0"] for p in (PROMPTS[0], PROMPTS[2])]
    finally:
        runner.close()
    assert passes[:4] == [3, 1, 1, 1]  # the pass, then each prompt alone
    assert finishes["r1"] == "error" and finishes["r0"] != "error" and finishes["r2"] != "error"
    assert together["r0"] == alone[0] and together["r2"] == alone[1]


def test_a_request_whose_sampling_fails_fails_alone(tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Choosing the batch's tokens raises because of one request (here: any batch holding a row
    with temperature 0.5): the batch is chosen again row by row, that request fails with an error,
    and the others, greedy and seeded, generate exactly what they generate alone."""
    from llmos.engine import choices

    real = choices.select_tokens
    calls = {"failed": 0}

    def poisoned(logits, sampling, fixed=None):  # type: ignore[no-untyped-def]
        if bool((sampling.temperature == 0.5).any()):
            calls["failed"] += 1
            raise RuntimeError("probability tensor contains nan")
        return real(logits, sampling, fixed)

    monkeypatch.setattr(choices, "select_tokens", poisoned)
    runner = _runner(tiny_chat_dir)
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    seeded = SamplingParams(max_tokens=6, temperature=1.0, seed=3)
    bad = SamplingParams(max_tokens=6, temperature=0.5)
    try:
        finishes: dict[str, str] = {}
        together = _generate(runner, [(PROMPTS[0], greedy), (PROMPTS[1], bad), (PROMPTS[2], seeded)], [], finishes)
        alone = [_generate(runner, [(p, s)], [])["r0"] for p, s in ((PROMPTS[0], greedy), (PROMPTS[2], seeded))]
    finally:
        runner.close()
    assert calls["failed"] >= 2  # the batch, then the row alone
    assert finishes["r1"] == "error" and finishes["r0"] == "length" and finishes["r2"] == "length"
    assert together["r0"] == alone[0] and together["r2"] == alone[1]
