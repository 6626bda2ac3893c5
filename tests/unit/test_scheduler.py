"""The one scheduler and runner loop, checked against both generation backends.

Every backend runs the same loop (``engine.runner.GenerationRunner``) over the same scheduler
(``engine.scheduler``); these tests run once per backend on a tiny model (the torch backend on
the tiny Llama, the llama.cpp backend on the same weights written as GGUF)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos.engine.choices import eos_ids
from llmos.engine.config import EngineConfig
from llmos.engine.protocol import FinishReason, GenerationDelta, GenerationRequest, SamplingParams
from llmos.engine.runner import GenerationRunner
from llmos.engine.scheduler import Pending, Scheduler
from tests.tiny_models import write_tiny_gguf

PROMPT = [1, 30, 31, 32, 33]
Make = Callable[..., GenerationRunner]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip(
        "llama_cpp", reason="the llama.cpp backend needs llama-cpp-python (installed by `make install`)"
    )
    return write_tiny_gguf(tiny_chat_dir, tmp_path_factory.mktemp("gguf") / "tiny-chat.F32.gguf")


@pytest.fixture(params=["torch", "llama.cpp"])
def make(request: pytest.FixtureRequest, tiny_chat_dir: Path) -> Iterator[Make]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    made: list[GenerationRunner] = []

    def build(**options: Any) -> GenerationRunner:
        config = EngineConfig(**{"max_batch_size": 8, "threads": 1, "llamacpp_cache_tokens": 2048, **options})
        runner: GenerationRunner
        if request.param == "torch":
            from llmos.engine.torch_backend import CausalRunner

            model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
            runner = CausalRunner(model, tokenizer, context_length=256, config=config)
        else:
            from llmos.engine.llamacpp_backend import LlamaCppRunner

            gguf = request.getfixturevalue("tiny_gguf")
            runner = LlamaCppRunner(gguf, tokenizer, eos_ids([], tokenizer), context_length=256, config=config)
        made.append(runner)
        return runner

    yield build
    for runner in made:
        runner.close()


class Sink:
    def __init__(self, n: int = 1) -> None:
        self.deltas: list[GenerationDelta] = []
        self.first = threading.Event()
        self.done = threading.Event()
        self._left = n

    def __call__(self, delta: GenerationDelta) -> None:
        self.deltas.append(delta)
        self.first.set()
        if delta.finish_reason is not None:
            self._left -= 1
            if self._left == 0:
                self.done.set()

    def wait(self) -> Sink:
        assert self.done.wait(60), "the request never finished"
        return self

    @property
    def tokens(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids]

    @property
    def finish(self) -> FinishReason | None:
        return next((d.finish_reason for d in self.deltas if d.finish_reason is not None), None)


def submit(runner: GenerationRunner, rid: str, *, tenant: str = "t", max_tokens: int = 8, **params: Any) -> Sink:
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, **params)
    request = GenerationRequest(rid, "tiny", PROMPT, sampling, tenant)
    runner.check_fits(request)
    sink = Sink(sampling.n)
    runner.submit(request, sink)
    return sink


def settle(runner: GenerationRunner) -> GenerationRunner:
    deadline = time.monotonic() + 30
    while runner.busy:
        assert time.monotonic() < deadline, "the runner stayed busy"
        time.sleep(0.01)
    return runner


def slowed(runner: GenerationRunner, step_s: float = 0.01) -> GenerationRunner:
    """Each iteration takes at least ``step_s``: a long request is still running when the test acts."""
    execute = runner._execute

    def slow() -> None:
        time.sleep(step_s)
        execute()

    runner._execute = slow  # type: ignore[method-assign]
    return runner


def decoding(runner: GenerationRunner) -> list[str]:
    """Tenants of the rows the next decode step advances (parked rows excluded)."""
    batch = getattr(runner, "_state", None) or getattr(runner, "_batch", None)
    return [row.tenant for row in batch.rows if not row.finished] if batch is not None else []


def test_a_request_submitted_after_close_ends_at_once(make: Make) -> None:
    runner = make()
    assert submit(runner, "before").wait().finish == FinishReason.LENGTH
    runner.close()
    late = submit(runner, "late")
    assert late.done.is_set() and late.finish == FinishReason.ABORT and late.tokens == []


def test_close_ends_what_runs_and_what_waits(make: Make) -> None:
    runner = slowed(make(max_batch_size=1, step_token_budget=2))  # one row in both backends
    running = submit(runner, "running", max_tokens=200)
    assert running.first.wait(30)
    queued = submit(runner, "queued")
    runner.close()
    assert running.wait().finish == FinishReason.ABORT
    assert queued.wait().finish == FinishReason.ABORT and queued.tokens == []


def test_abort_while_queued_and_while_running(make: Make) -> None:
    runner = slowed(make(max_batch_size=1, step_token_budget=2))  # one row in both backends
    running = submit(runner, "running", max_tokens=200)
    assert running.first.wait(30)
    queued = submit(runner, "queued")
    runner.abort("queued")
    assert queued.wait().finish == FinishReason.ABORT and queued.tokens == []
    assert not running.done.is_set()  # the queued one ended at once, not when a row came free
    runner.abort("running")
    assert running.wait().finish == FinishReason.ABORT and len(running.tokens) < 200
    assert submit(runner, "after").wait().finish == FinishReason.LENGTH
    assert not settle(runner).busy
    assert getattr(runner, "cells_reserved", 0) == 0


def test_a_flood_is_held_to_its_tenants_share_while_a_light_tenant_decodes(make: Make) -> None:
    runner = slowed(make(tenant_rows_when_shared=2), 0.002)
    seen: list[Counter[str]] = []
    execute = runner._execute

    def recording() -> None:
        seen.append(Counter(decoding(runner)))
        execute()

    runner._execute = recording  # type: ignore[method-assign]
    flood = [submit(runner, f"f{i}", tenant="flood", max_tokens=120) for i in range(6)]
    deadline = time.monotonic() + 30
    while not all(len(sink.deltas) >= 3 for sink in flood):  # alone, it decodes with the whole batch
        assert time.monotonic() < deadline
        time.sleep(0.001)
    light = submit(runner, "light", tenant="light", max_tokens=20).wait()
    assert light.finish == FinishReason.LENGTH
    for sink in flood:
        assert sink.wait().finish == FinishReason.LENGTH and len(sink.tokens) == 120  # parked, never lost
    shared = [step for step in seen if step["light"]]
    assert shared and all(step["flood"] <= 2 for step in shared)
    assert max(step["flood"] for step in seen) == 6  # alone, the flood had the whole batch
    assert runner.rows_parked >= 4


def test_a_failed_step_fails_its_rows_and_the_loop_goes_on(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = make()
    if hasattr(runner, "llama"):
        from llmos.engine.llamacpp_backend.library import DecodeError

        target, name, exc = runner.llama, "decode", DecodeError(-3)
    else:
        target, name, exc = runner, "_step", RuntimeError("a failed decode step")
    real = getattr(target, name)
    calls = {"n": 0}

    def failing_once(*args: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise exc
        return real(*args)

    monkeypatch.setattr(target, name, failing_once)
    failed = submit(runner, "failed").wait()
    assert failed.finish == FinishReason.ERROR and failed.deltas[-1].error
    assert submit(runner, "next").wait().finish == FinishReason.LENGTH
    assert runner.crashed is None


def test_a_crash_of_the_loop_is_reported_and_frees_the_backend(make: Make) -> None:
    runner = make()
    seen: list[BaseException] = []
    runner.on_crash = seen.append
    released = threading.Event()
    release = runner._release

    def recording_release() -> None:
        released.set()
        release()

    def broken() -> None:
        raise RuntimeError("a bug in the loop")

    runner._execute = broken  # type: ignore[method-assign]
    runner._release = recording_release  # type: ignore[method-assign]
    submit(runner, "x")
    thread = runner._thread
    assert thread is not None
    thread.join(30)
    assert isinstance(runner.crashed, RuntimeError) and seen == [runner.crashed]
    assert released.is_set()


def test_an_idle_loop_waits_batch_wait_for_company_from_the_first_arrival(make: Make) -> None:
    runner = make(batch_wait_s=0.5)
    admitted: list[list[str]] = []
    admit = runner.scheduler.admit

    def recording(**kwargs: Any) -> list[Pending]:
        taken = admit(**kwargs)
        if taken:
            admitted.append([p.request.request_id for p in taken])
        return taken

    runner.scheduler.admit = recording  # type: ignore[method-assign]
    submit(runner, "warm", max_tokens=2).wait()
    time.sleep(0.7)  # the loop waits idle for work, longer than the batch wait (its thread lives on 1 s)
    first = submit(runner, "first", max_tokens=2)
    time.sleep(0.1)  # within the batch wait of the first's arrival
    second = submit(runner, "second", max_tokens=2)
    first.wait()
    second.wait()
    assert admitted == [["warm"], ["first", "second"]]


# -- the scheduler alone -----------------------------------------------------------------------
def _pending(rid: str, tenant: str, reserve: int = 10, n: int = 1) -> Pending:
    request = GenerationRequest(rid, "m", [1], SamplingParams(n=n), tenant)
    return Pending(request, lambda delta: None, reserve)


def test_admission_stops_at_the_first_request_that_does_not_fit() -> None:
    scheduler = Scheduler(max_rows=8, batch_wait_s=0, light_rows=0)
    for rid, reserve in (("a", 10), ("b", 50), ("c", 10)):
        scheduler.put(_pending(rid, "t", reserve))
    reserved: list[int] = []
    taken = scheduler.admit(block=False, held=Counter(), reserved=reserved, fits=lambda r: sum(r) <= 40)
    assert [p.request.request_id for p in taken] == ["a"] and reserved == [10]
    # Alone, a request always runs (it was checked to fit the cache by itself before it was queued).
    taken = scheduler.admit(block=False, held=Counter(), reserved=[], fits=lambda r: sum(r) <= 40)
    assert [p.request.request_id for p in taken] == ["b"]


def test_a_tenant_at_its_share_is_passed_over_not_waited_behind() -> None:
    scheduler = Scheduler(max_rows=8, batch_wait_s=0, light_rows=2)
    for i in range(4):
        scheduler.put(_pending(f"f{i}", "flood"))
    scheduler.put(_pending("l", "light"))
    taken = scheduler.admit(block=False, held=Counter(flood=2), reserved=[10, 10], fits=lambda r: True)
    assert [p.request.request_id for p in taken] == ["l"]
    assert scheduler.queue.waiting() == {"flood": 4}


def test_an_aborted_request_is_never_admitted() -> None:
    scheduler = Scheduler(max_rows=8, batch_wait_s=0, light_rows=0)
    ended: list[GenerationDelta] = []
    pending = _pending("gone", "t", n=2)
    pending.sink = ended.append
    scheduler.put(pending)
    scheduler.abort("gone")
    assert scheduler.admit(block=False, held=Counter(), reserved=[], fits=lambda r: True) == []
    assert [d.finish_reason for d in ended] == [FinishReason.ABORT, FinishReason.ABORT]


def test_shares_park_the_latest_rows_over_a_cap_and_resume_the_earliest() -> None:
    scheduler = Scheduler(max_rows=4, batch_wait_s=0, light_rows=1)
    park, resume = scheduler.shares(["a", "a", "b", "a"], [], {"a": 2, "b": 2})
    assert park == [3] and resume == []
    park, resume = scheduler.shares(["a", "b"], ["a", "b", "a"], {"a": 3, "b": 1})
    assert park == [] and resume == [0, 2]
    assert scheduler.parks == 1


def test_a_loop_that_ends_idle_gives_freed_memory_back(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmos.engine import heap

    monkeypatch.setattr("llmos.engine.scheduler.IDLE_EXIT_S", 0.05)
    trims: list[bool] = []
    monkeypatch.setattr(heap, "trim", lambda: trims.append(True))
    runner = make(heap_slack_bytes=0)  # no trims within the burst: only the one at its end
    submit(runner, "r").wait()
    thread = runner._thread
    assert thread is not None
    thread.join(10)
    assert not thread.is_alive() and trims == [True]


def test_a_working_loop_keeps_freed_memory_within_its_slack(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmos.engine import heap

    slacks: list[int] = []

    def release_beyond(slack: int) -> bool:
        slacks.append(slack)
        return False

    monkeypatch.setattr(heap, "release_beyond", release_beyond)
    # One token a step (a speculative verify could stream all four in one).
    submit(make(heap_slack_bytes=5 << 20, speculative_decoding="off"), "r", max_tokens=4).wait()
    # After every step; the last step's check may come just after the request's end is signalled.
    assert len(slacks) >= 3 and set(slacks) == {5 << 20}
    submit(make(heap_slack_bytes=0), "r", max_tokens=4).wait()
    assert 0 not in slacks  # 0: only when the loop ends idle (the first loop's last check may land late)
