"""Scoring prompts (prompt logprobs, at most one token generated) yield each step to prompts that
generate: those are planned first, while generating work is about scoring takes at most
``scoring_step_tokens`` of a step, so an interactive first token waits behind short steps, and the
step that prefills a generating prompt holds no scoring tokens unless the step before it held
none either."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from llmos.engine.config import EngineConfig
from llmos.engine.protocol import GenerationDelta, GenerationRequest, SamplingParams
from llmos.engine.scheduler import Pending
from llmos.engine.torch_backend import causal, prefill
from llmos.engine.torch_backend.causal import CausalRunner

GENERATE = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
SCORE = SamplingParams(max_tokens=0, prompt_logprobs=1)
FIRST_ONLY = SamplingParams(max_tokens=1, temperature=0.0)  # generates: its one token ends it in its prefill's step


def _job(tokens: int, params: SamplingParams, name: str = "r") -> prefill.Prefill:
    pending = Pending(GenerationRequest(name, "m", [0] * tokens, params), sink=lambda d: None, reserve=tokens)
    return prefill.Prefill(pending=pending, prompt=[0] * tokens, lead=0, cache=DynamicCache(), done=0)


def test_which_requests_are_scoring() -> None:
    assert GenerationRequest("a", "m", [1], SCORE).scoring
    assert GenerationRequest("a", "m", [1], SamplingParams(max_tokens=1, prompt_logprobs=0)).scoring  # a harness's
    assert not GenerationRequest("a", "m", [1], SamplingParams(max_tokens=2, prompt_logprobs=1)).scoring
    assert not GenerationRequest("a", "m", [1], SamplingParams(max_tokens=0)).scoring


def test_generating_prompts_are_planned_first_and_scoring_ones_get_their_share() -> None:
    scoring, generating = _job(60, SCORE, "s"), _job(100, GENERATE, "g")
    # Fewest remaining first would put the scoring prompt ahead; generating goes first instead.
    assert [
        (j.pending.request.request_id, t) for j, t in prefill.plan_chunks([scoring, generating], 128, 128, None)
    ] == [
        ("g", 100),
        ("s", 27),  # the rest less the generating row's decode token
    ]
    # While generating work is about, scoring takes at most its share of the step.
    assert [(j.pending.request.request_id, t) for j, t in prefill.plan_chunks([scoring, generating], 256, 256, 16)] == [
        ("g", 100),
        ("s", 16),
    ]
    two = [_job(10, SCORE, "s1"), _job(10, SCORE, "s2")]
    planned = prefill.plan_chunks(two, 256, 256, 16)  # the share is the step's, not each prompt's
    assert [t for _, t in planned] == [10, 5]  # 10 and the row's decode token, then the rest of 16
    assert [t for _, t in prefill.plan_chunks(two, 256, 256, None)] == [10, 10]  # alone: the whole step


def test_a_step_that_prefills_a_generating_prompt_yields_all_of_it_unless_the_last_one_did() -> None:
    scoring, generating = _job(60, SCORE, "s"), _job(20, GENERATE, "g")
    yielded = prefill.plan_chunks([scoring, generating], 256, 256, 16, yield_step=True)
    assert [(j.pending.request.request_id, t) for j, t in yielded] == [("g", 20)]
    # After a step that yielded, scoring keeps its share beside the next arrival: it never starves.
    kept = prefill.plan_chunks([scoring, generating], 256, 256, 16, yield_step=False)
    assert [(j.pending.request.request_id, t) for j, t in kept] == [("g", 20), ("s", 16)]
    # With no generating prompt to prefill there is nothing to yield to.
    assert [t for _, t in prefill.plan_chunks([scoring], 256, 256, 16, yield_step=True)] == [16]


def _recording_passes(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, int]]]:
    """Every packed prefill pass the runner runs, as ``(request id, tokens)`` per chunk."""
    passes: list[list[tuple[str, int]]] = []
    packed = causal.run_packed

    def recording(decoder: object, planned: list[tuple[prefill.Prefill, int]], lora: object = None) -> None:
        passes.append([(job.pending.request.request_id, take) for job, take in planned])
        packed(decoder, planned, lora)

    monkeypatch.setattr(causal, "run_packed", recording)
    return passes


def test_an_arrival_is_prefilled_without_scoring_tokens_and_scoring_still_progresses(
    tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes = _recording_passes(monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    config = EngineConfig(batch_wait_s=0.5, prefill_chunk_tokens=64, scoring_step_tokens=8)
    runner = CausalRunner(model, AutoTokenizer.from_pretrained(tiny_chat_dir), context_length=128, config=config)
    done = threading.Semaphore(0)
    arrivals = iter(["gen2", "gen3"])  # each first token brings the next request, prefilled the step after

    def finished(delta: GenerationDelta) -> None:
        if delta.finish_reason is not None:
            done.release()

    def then_next(delta: GenerationDelta) -> None:
        """A generating request's sink: its delta submits the next arrival (on the engine thread)."""
        following = next(arrivals, None)
        if following is not None:
            runner.submit(GenerationRequest(following, "m", list(range(5, 15)), FIRST_ONLY), then_next)
        finished(delta)

    try:
        runner.submit(GenerationRequest("score", "m", list(range(5, 85)), SCORE), finished)
        runner.submit(GenerationRequest("gen1", "m", list(range(5, 15)), FIRST_ONLY), then_next)
        for _ in range(4):
            assert done.acquire(timeout=60)
    finally:
        runner.close()
    with_gen = [p for p in passes if any(rid.startswith("gen") for rid, _ in p)]
    assert [rid for rid, _ in with_gen[0]] == ["gen1"]  # the first arrival's pass holds no scoring tokens
    # gen2 arrives in the very next step: scoring, which just yielded, keeps its share beside it.
    assert with_gen[1] == [("gen2", 10), ("score", 8)]
    assert [rid for rid, _ in with_gen[2]] == ["gen3"]  # and yields again the step after
    assert sum(t for p in passes for rid, t in p if rid == "score") == 80


def test_a_scoring_prompt_takes_small_chunks_while_a_request_generates(
    tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    takes: list[tuple[str, int]] = []
    packed = causal.run_packed

    def recording(decoder: object, planned: list[tuple[prefill.Prefill, int]], lora: object = None) -> None:
        takes.extend((job.pending.request.request_id, take) for job, take in planned)
        packed(decoder, planned, lora)

    monkeypatch.setattr(causal, "run_packed", recording)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    config = EngineConfig(batch_wait_s=0.5, prefill_chunk_tokens=64, scoring_step_tokens=8)
    runner = CausalRunner(model, AutoTokenizer.from_pretrained(tiny_chat_dir), context_length=128, config=config)
    scored: list[GenerationDelta] = []
    done = threading.Semaphore(0)

    def generated(delta: GenerationDelta) -> None:
        if delta.finish_reason is not None:
            done.release()

    def scores(delta: GenerationDelta) -> None:
        scored.append(delta)
        if delta.finish_reason is not None:
            done.release()

    prompt = list(range(5, 85))
    try:
        runner.submit(GenerationRequest("gen", "m", list(range(5, 15)), GENERATE), generated)
        runner.submit(GenerationRequest("score", "m", prompt, SCORE), scores)
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        runner.close()
    scoring = [take for rid, take in takes if rid == "score"]
    assert sum(scoring) == len(prompt)
    assert all(take <= 8 for take in scoring)  # never more than its share: the request generated all along
    # The scores are the prompt's, however it was chunked: one per token, the first without one.
    (delta,) = scored
    assert [p.token_id for p in delta.prompt_logprobs] == prompt
    assert delta.prompt_logprobs[0].logprob is None and all(p.logprob is not None for p in delta.prompt_logprobs[1:])


def _score_and_generate(config: EngineConfig, tiny_chat_dir: Path) -> CausalRunner:
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    return CausalRunner(model, AutoTokenizer.from_pretrained(tiny_chat_dir), context_length=128, config=config)


def _recording_pauses(runner: CausalRunner, monkeypatch: pytest.MonkeyPatch) -> tuple[list[float], threading.Event]:
    """The timeout of every pause the runner's engine takes for arrivals, and an event set at the first."""
    pauses: list[float] = []
    paused = threading.Event()
    wait_for = runner.scheduler.wait_for

    def recording(wanted: object, timeout: float) -> bool:
        pauses.append(timeout)
        paused.set()
        return wait_for(wanted, timeout)  # type: ignore[arg-type]

    monkeypatch.setattr(runner.scheduler, "wait_for", recording)
    return pauses, paused


def test_the_scheduler_waits_for_a_generating_arrival_and_wakes_at_once() -> None:
    from llmos.engine.scheduler import Scheduler

    scheduler = Scheduler(8, 0.0, 0)
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(scheduler.wait_for(causal._generating, 600)))
    waiter.start()
    scheduler.put(Pending(GenerationRequest("s", "m", [1, 2], SCORE), sink=lambda d: None, reserve=2))
    waiter.join(0.2)
    assert waiter.is_alive()  # a scoring arrival does not end it
    scheduler.put(Pending(GenerationRequest("g", "m", [1, 2], GENERATE), sink=lambda d: None, reserve=26))
    waiter.join(30)
    assert not waiter.is_alive() and results == [True]  # a generating one does, long before its 600 s
    assert len(scheduler.queue) == 2  # nothing was taken: the loop admits them next
    closing = threading.Thread(target=lambda: results.append(Scheduler(8, 0.0, 0).wait_for(causal._generating, 0)))
    closing.start()
    closing.join(30)
    assert results == [True, False]  # nothing queued and no time to wait
    scheduler = Scheduler(8, 0.0, 0)
    waiter = threading.Thread(target=lambda: results.append(scheduler.wait_for(causal._generating, 600)))
    waiter.start()
    scheduler.wake()  # close ends the wait too
    waiter.join(30)
    assert not waiter.is_alive() and results == [True, False, True]


def test_scoring_steps_pause_for_arrivals_only_while_generating_work_is_about(
    tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(causal, "RECENT_S", 600.0)  # "about" however slowly a loaded machine steps
    config = EngineConfig(batch_wait_s=0.5, prefill_chunk_tokens=32, scoring_step_tokens=8, scoring_pause_ratio=1.0)
    alone = _score_and_generate(config, tiny_chat_dir)
    pauses, _ = _recording_pauses(alone, monkeypatch)
    passes = _recording_passes(monkeypatch)
    done = threading.Semaphore(0)
    try:
        for name in ("s1", "s2"):
            alone.submit(GenerationRequest(name, "m", list(range(5, 85)), SCORE), lambda d: done.release())
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        alone.close()
    assert len(passes) >= 5 and pauses == []  # scoring alone runs step after step: its throughput is kept
    passes.clear()

    beside = _score_and_generate(config, tiny_chat_dir)
    pauses, _ = _recording_pauses(beside, monkeypatch)
    try:
        # The generating request first: whether or not the scoring one comes in the same step, it
        # finds generating work about.
        beside.submit(GenerationRequest("gen", "m", list(range(5, 15)), FIRST_ONLY), lambda d: done.release())
        beside.submit(GenerationRequest("score", "m", list(range(5, 85)), SCORE), lambda d: done.release())
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        beside.close()
    scoring_only = [p for p in passes if all(rid == "score" for rid, _ in p)]
    assert len(scoring_only) >= 10  # at most 8 tokens a step: generating work was about all along
    # A pause before every scoring-only step, as long as the step before it took.
    assert len(pauses) == len(scoring_only) and all(p > 0 for p in pauses)

    batch = _score_and_generate(config, tiny_chat_dir)
    pauses, _ = _recording_pauses(batch, monkeypatch)
    try:
        # A batch's line beside generating work: no scoring prompt, so nothing is scoring's to pause.
        batch.submit(GenerationRequest("gen", "m", list(range(5, 15)), FIRST_ONLY), lambda d: done.release())
        batch.submit(
            GenerationRequest("line", "m", list(range(5, 85)), GENERATE, background=True),
            lambda d: done.release() if d.finish_reason is not None else None,
        )
        assert done.acquire(timeout=60) and done.acquire(timeout=60)
    finally:
        batch.close()
    assert pauses == []


def test_a_pause_ends_when_a_generating_request_arrives(tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Pauses a million times their step: one that did not end on the arrival would outlast the test.
    monkeypatch.setattr(causal, "RECENT_S", 600.0)  # "about" however slowly a loaded machine steps
    config = EngineConfig(batch_wait_s=0.5, prefill_chunk_tokens=32, scoring_step_tokens=8, scoring_pause_ratio=1e6)
    runner = _score_and_generate(config, tiny_chat_dir)
    pauses, paused = _recording_pauses(runner, monkeypatch)
    passes = _recording_passes(monkeypatch)
    answered = threading.Semaphore(0)

    def answer(delta: GenerationDelta) -> None:
        if delta.finish_reason is not None:
            answered.release()

    try:
        runner.submit(GenerationRequest("gen1", "m", list(range(5, 15)), FIRST_ONLY), answer)
        runner.submit(GenerationRequest("score", "m", list(range(5, 85)), SCORE), lambda d: None)
        assert answered.acquire(timeout=60)
        assert paused.wait(timeout=60)  # the scoring step after gen1's answer waits first
        runner.submit(GenerationRequest("gen2", "m", list(range(5, 15)), FIRST_ONLY), answer)
        assert answered.acquire(timeout=60)  # answered in the pause, not after it
        assert len(pauses) >= 1
    finally:
        runner.close()  # ends the pause before the scoring step after gen2
    ids = [{rid for rid, _ in p} for p in passes]
    first_gen2 = next(i for i, p in enumerate(ids) if "gen2" in p)
    # The request that follows an answer is prefilled next: no scoring step began in between.
    assert ids[first_gen2 - 1] == {"gen1"}, ids


def test_a_generating_request_left_waiting_for_room_does_not_stop_scoring(
    tiny_chat_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(causal, "RECENT_S", 600.0)
    config = EngineConfig(batch_wait_s=0.5, prefill_chunk_tokens=32, scoring_step_tokens=8, scoring_pause_ratio=1e6)
    runner = _score_and_generate(config, tiny_chat_dir)
    monkeypatch.setattr(runner, "_fits", lambda reserved: len(reserved) <= 1)  # room for one row at a time
    _, paused = _recording_pauses(runner, monkeypatch)
    answered, scored = threading.Semaphore(0), threading.Event()
    try:
        runner.submit(
            GenerationRequest("gen1", "m", list(range(5, 15)), FIRST_ONLY),
            lambda d: answered.release() if d.finish_reason is not None else None,
        )
        assert answered.acquire(timeout=60)
        runner.submit(
            GenerationRequest("score", "m", list(range(5, 85)), SCORE),
            lambda d: scored.set() if d.finish_reason is not None else None,
        )
        assert paused.wait(timeout=60)
        runner.submit(
            GenerationRequest("gen2", "m", list(range(5, 15)), FIRST_ONLY),
            lambda d: answered.release() if d.finish_reason is not None else None,
        )
        # gen2 ends the pause but cannot be admitted while the scoring row holds the room: the
        # scoring steps go on rather than pausing for it again and again, and then gen2 is answered.
        assert scored.wait(timeout=60)
        assert answered.acquire(timeout=60)
    finally:
        runner.close()
