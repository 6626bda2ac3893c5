"""Only compute threads run torch on several cores: helper threads use one, encoder forward passes
all run on the one shared compute thread, and a chat model's engine thread uses the configured
count; compute threads end when idle (see llmos.engine.threads for why a second OpenMP team
slows every decode step)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from llmos.engine import threads
from llmos.engine.protocol import GenerationDelta, GenerationRequest, SamplingParams
from llmos.engine.torch_backend.causal import CausalRunner
from llmos.engine.torch_backend.encoder import EncoderRunner, Pooling


def test_helper_threads_run_torch_on_one_core() -> None:
    with threads.helper_pool(2) as pool:
        assert set(pool.map(lambda _: torch.get_num_threads(), range(4))) == {1}


def test_encoder_forward_passes_run_on_the_one_compute_thread(tiny_encoder_dir: Path) -> None:
    model = AutoModel.from_pretrained(tiny_encoder_dir, dtype=torch.float32).eval()
    runner = EncoderRunner(model, AutoTokenizer.from_pretrained(tiny_encoder_dir), Pooling(), max_length=64)
    seen: list[tuple[str, int]] = []
    forward = runner._forward

    def recording(batch: list[list[int]]) -> torch.Tensor:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return forward(batch)

    runner._forward = recording  # type: ignore[method-assign]
    with threads.helper_pool(4) as pool:
        results = list(pool.map(lambda i: runner.embed([f"text number {i}"]), range(8)))
    assert all(len(r.vectors) == 1 for r in results)
    assert seen and {name for name, _ in seen} == {seen[0][0]}
    assert seen[0][0].startswith("engine-compute")
    assert {n for _, n in seen} == {threads.compute_threads()}


def test_the_engine_thread_uses_the_compute_thread_count(tiny_chat_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    runner = CausalRunner(model, AutoTokenizer.from_pretrained(tiny_chat_dir), context_length=128)
    counts: list[int] = []
    original = runner._step

    def recording(state: Any) -> Any:
        counts.append(torch.get_num_threads())
        return original(state)

    runner._step = recording  # type: ignore[method-assign]
    done = threading.Event()

    def sink(delta: GenerationDelta) -> None:
        if delta.finish_reason is not None:
            done.set()

    with ThreadPoolExecutor(1, initializer=threads.enter_helper_thread) as pool:  # submitted from a helper
        pool.submit(runner.submit, GenerationRequest("r", "m", [5, 6, 7], SamplingParams(max_tokens=3)), sink)
        assert done.wait(60)
    runner.close()
    assert counts and set(counts) == {threads.compute_threads()}


def test_the_encoders_compute_thread_ends_when_idle_and_work_starts_another() -> None:
    """An idle compute thread would keep its OpenMP team alive and slow the chat models' steps."""
    compute = threads._ComputeThread(idle_exit_s=0.05)
    first, count = compute.run(lambda: (threading.current_thread(), torch.get_num_threads()))
    assert count == threads.compute_threads() and compute.threads_started == 1
    assert compute.run(lambda: threading.current_thread()) is first  # busy: the same thread
    first.join(timeout=5)
    assert not first.is_alive()
    second = compute.run(lambda: threading.current_thread())
    assert second is not first and compute.threads_started == 2
    try:
        compute.run(lambda: 1 // 0)
    except ZeroDivisionError:
        pass
    else:
        raise AssertionError("the work's exception reaches its caller")


def test_an_idle_engine_thread_ends_and_the_next_request_starts_another(tiny_chat_dir: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr("llmos.engine.scheduler.IDLE_EXIT_S", 0.05)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    runner = CausalRunner(model, AutoTokenizer.from_pretrained(tiny_chat_dir), context_length=128)

    def generate(request_id: str) -> list[int]:
        tokens: list[int] = []
        done = threading.Event()

        def sink(delta: GenerationDelta) -> None:
            tokens.extend(delta.token_ids)
            if delta.finish_reason is not None:
                done.set()

        greedy = SamplingParams(max_tokens=4, temperature=0.0)
        runner.submit(GenerationRequest(request_id, "m", [5, 6, 7], greedy), sink)
        assert done.wait(60)
        return tokens

    first = generate("a")
    thread = runner._thread
    assert thread is not None
    thread.join(timeout=5)
    assert not thread.is_alive() and runner._thread is None  # ended idle
    assert generate("b") == first and runner.threads_started == 2  # a new thread, the same answer
    thread = runner._thread
    assert thread is not None
    thread.join(timeout=5)
    runner.close()  # after it ended idle: nothing to stop, and no thread starts again
    ended: list[GenerationDelta] = []
    runner.submit(GenerationRequest("late", "m", [5, 6, 7], SamplingParams(max_tokens=4)), ended.append)
    assert [d.finish_reason for d in ended] == ["abort"] and runner._thread is None


def test_a_compute_thread_that_cannot_start_fails_its_call_and_the_next_call_starts_one(monkeypatch: Any) -> None:
    compute = threads._ComputeThread(idle_exit_s=0.05)
    start = threading.Thread.start
    attempts: list[int] = []

    def start_failing_once(self: threading.Thread) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("can't start new thread")
        start(self)

    monkeypatch.setattr(threading.Thread, "start", start_failing_once)
    try:
        compute.run(lambda: 1)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the failed start reaches the caller")
    assert compute.run(lambda: 2) == 2 and compute.threads_started == 1  # nothing stranded
