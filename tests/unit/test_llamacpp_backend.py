"""The llama.cpp backend on a tiny GGUF written from the tiny Llama model: what it computes is
checked against transformers on the same weights, and its batching, prefix sharing, admission,
aborts and failures against what a server must do."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp", reason="the llama.cpp backend needs llama-cpp-python (installed by `make install`)")

from llmos.engine.choices import eos_ids
from llmos.engine.config import EngineConfig
from llmos.engine.llamacpp_backend import LlamaCppRunner
from llmos.engine.llamacpp_backend.library import DecodeError, LlamaCpp
from llmos.engine.protocol import FinishReason, GenerationDelta, GenerationRequest, SamplingParams
from llmos.errors import InvalidRequestError
from tests.tiny_models import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tiny_chat_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tiny_chat_dir, tmp_path_factory.mktemp("gguf") / "tiny-chat.F32.gguf")


@pytest.fixture(scope="module")
def reference(tiny_chat_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_dir: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_dir)


@pytest.fixture
def make_runner(tiny_gguf: Path, tokenizer: object) -> Iterator[object]:
    made: list[LlamaCppRunner] = []

    def make(**kwargs: object) -> LlamaCppRunner:
        options: dict[str, object] = {"llamacpp_cache_tokens": 2048, "max_batch_size": 8, "threads": 1}
        options.update(kwargs)
        config = EngineConfig(**options)  # type: ignore[arg-type]
        runner = LlamaCppRunner(tiny_gguf, tokenizer, eos_ids([], tokenizer), context_length=256, config=config)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.close()


class Collector:
    def __init__(self, n: int = 1) -> None:
        self.deltas: list[GenerationDelta] = []
        self.done = threading.Event()
        self._left = n

    def __call__(self, delta: GenerationDelta) -> None:
        self.deltas.append(delta)
        if delta.finish_reason is not None:
            self._left -= 1
            if self._left == 0:
                self.done.set()

    def wait(self) -> Collector:
        assert self.done.wait(60), "the request never finished"
        return self

    def tokens(self, index: int = 0) -> list[int]:
        return [t for d in self.deltas if d.index == index for t in d.token_ids]

    def logprobs(self, index: int = 0) -> list[float]:
        return [lp.logprob for d in self.deltas if d.index == index for lp in d.logprobs]

    def finish(self, index: int = 0) -> FinishReason | None:
        return next(d.finish_reason for d in self.deltas if d.index == index and d.finish_reason is not None)


def submit(
    runner: LlamaCppRunner, prompt: list[int], *, rid: str = "r", tenant: str = "t", **params: object
) -> Collector:
    sampling = SamplingParams(**{"max_tokens": 12, "temperature": 0.0, "logprobs": True, **params})  # type: ignore[arg-type]
    request = GenerationRequest(rid, "tiny", prompt, sampling, tenant)
    runner.check_fits(request)
    sink = Collector(sampling.n)
    runner.submit(request, sink)
    return sink


def idle(runner: LlamaCppRunner) -> LlamaCppRunner:
    """The runner once it has retired what finished (its last delta goes out just before)."""
    for _ in range(600):
        if not runner.busy:
            return runner
        threading.Event().wait(0.05)
    raise AssertionError("the runner stayed busy")


def teacher_forced(reference: torch.nn.Module, prompt: list[int], tokens: list[int]) -> list[float]:
    """What transformers gives the tokens the runner chose, one by one after the prompt."""
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + tokens])).logits[0]
    logp = torch.log_softmax(logits.float(), -1)
    return [float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(tokens)]


PROMPTS = [[1, 30, 31, 32, 33], [1, 50, 60, 70], [1, 30, 31, 90, 91, 92, 93, 94, 95]]


def test_logits_of_a_batch_of_sequences_match_transformers(tiny_gguf: Path, reference: torch.nn.Module) -> None:
    llama = LlamaCpp(tiny_gguf, n_ctx=256, n_seq_max=4, n_batch=32, threads=1)
    try:
        tokens = np.array(PROMPTS[0] + PROMPTS[1])
        positions = np.array(list(range(len(PROMPTS[0]))) + list(range(len(PROMPTS[1]))))
        seqs = np.array([0] * len(PROMPTS[0]) + [1] * len(PROMPTS[1]))
        out = llama.decode(tokens, positions, seqs, np.ones(len(tokens), dtype=bool))
        with torch.no_grad():
            first = reference(torch.tensor([PROMPTS[0]])).logits[0].numpy()
            second = reference(torch.tensor([PROMPTS[1]])).logits[0].numpy()
        assert out.shape == (len(tokens), first.shape[-1])
        np.testing.assert_allclose(out, np.concatenate([first, second]), atol=1e-3)
        with pytest.raises(ValueError, match="1 to 32 tokens"):
            llama.decode(np.arange(33), np.arange(33), np.zeros(33), np.ones(33, dtype=bool))
    finally:
        llama.close()


def test_concurrent_requests_generate_what_transformers_gives_them(make_runner, reference) -> None:
    runner = make_runner()
    sinks = [submit(runner, p, rid=f"r{i}") for i, p in enumerate(PROMPTS)]
    for prompt, sink in zip(PROMPTS, sinks, strict=True):
        sink.wait()
        tokens = sink.tokens()
        assert len(tokens) == 12 and sink.finish() == FinishReason.LENGTH
        np.testing.assert_allclose(sink.logprobs(), teacher_forced(reference, prompt, tokens), atol=2e-3)
    assert runner.peak_rows >= 2  # they were decoded together
    assert idle(runner).cells_reserved == 0


def test_a_prompt_starts_from_the_prefix_its_tenant_left_in_the_cache(make_runner, reference) -> None:
    runner = make_runner()
    system = list(range(100, 140))  # 40 tokens every prompt of this test starts with
    first = submit(runner, [*system, 7, 8], rid="a").wait()
    computed = runner.prefill_tokens
    second = submit(runner, [*system, 9, 10, 11], rid="b").wait()
    assert runner.prefix_hits == 1 and runner.prefix_tokens_reused == 40
    assert runner.prefill_tokens - computed == 3  # only what follows the shared prefix
    for prompt, sink in (([*system, 7, 8], first), ([*system, 9, 10, 11], second)):
        np.testing.assert_allclose(sink.logprobs(), teacher_forced(reference, prompt, sink.tokens()), atol=2e-3)
    computed = runner.prefill_tokens
    submit(runner, [*system, 9, 10, 11], rid="c", tenant="other").wait()
    assert runner.prefix_hits == 1, "another tenant's cached prompt is never reused"
    assert runner.prefill_tokens - computed == 43


def test_no_prefix_is_shared_when_the_prefix_cache_is_off(make_runner) -> None:
    runner = make_runner(prefix_cache_bytes=0)  # prefix_cache_mb = 0
    system = list(range(100, 140))
    submit(runner, [*system, 7, 8], rid="a").wait()
    submit(runner, [*system, 9, 10, 11], rid="b").wait()
    sinks = [submit(runner, [*system, 5 + i, 6 + i], rid=f"r{i}") for i in range(2)]  # arriving together
    for sink in sinks:
        sink.wait()
    assert runner.prefix_hits == 0 and runner.prefix_tokens_reused == 0
    assert runner.prefill_tokens == 42 + 43 + 2 * 42


def test_prompts_arriving_together_compute_their_shared_prefix_once(make_runner, reference) -> None:
    runner = make_runner(prefill_chunk_tokens=64)
    system = list(range(100, 180))  # 80 tokens: more than one chunk
    prompts = [[*system, 5 + i, 6 + i] for i in range(4)]
    sinks = [submit(runner, p, rid=f"r{i}") for i, p in enumerate(prompts)]
    for prompt, sink in zip(prompts, sinks, strict=True):
        sink.wait()
        np.testing.assert_allclose(sink.logprobs(), teacher_forced(reference, prompt, sink.tokens()), atol=2e-3)
    assert runner.prefill_tokens == 82 + 3 * 2


def test_choices_share_their_prompt_and_a_seed_reproduces_them(make_runner) -> None:
    runner = make_runner()
    params = {"n": 3, "temperature": 1.0, "seed": 7, "logprobs": False}
    first = submit(runner, PROMPTS[0], rid="a", **params).wait()
    again = submit(runner, PROMPTS[0], rid="b", **params).wait()
    choices = [first.tokens(i) for i in range(3)]
    assert choices == [again.tokens(i) for i in range(3)]
    assert len({tuple(c) for c in choices}) > 1, "three seeded choices drew the same tokens"


def test_abort_stops_a_request_and_frees_its_cells(make_runner) -> None:
    runner = make_runner()
    started = threading.Event()
    sink = Collector()

    def watch(delta: GenerationDelta) -> None:
        sink(delta)
        started.set()

    runner.submit(GenerationRequest("long", "tiny", PROMPTS[0], SamplingParams(max_tokens=200, temperature=0.0)), watch)
    assert started.wait(30)
    runner.abort("long")
    sink.wait()
    assert sink.finish() == FinishReason.ABORT and len(sink.tokens()) < 200
    assert submit(runner, PROMPTS[1], rid="next").wait().finish() == FinishReason.LENGTH
    assert idle(runner).cells_reserved == 0


def test_a_request_that_cannot_fit_the_cache_is_refused_and_one_that_can_waits(make_runner) -> None:
    runner = make_runner(llamacpp_cache_tokens=256)
    too_big = GenerationRequest("big", "tiny", PROMPTS[0], SamplingParams(max_tokens=100, n=3))
    with pytest.raises(InvalidRequestError) as refused:
        runner.check_fits(too_big)
    assert refused.value.code == "kv_cache_exceeded"
    # Two requests of 150 cells each cannot run together in 256: the second waits, then runs.
    sinks = [submit(runner, PROMPTS[i], rid=f"w{i}", max_tokens=150 - len(PROMPTS[i])) for i in range(2)]
    for sink in sinks:
        assert sink.wait().finish() in (FinishReason.LENGTH, FinishReason.STOP)
    assert runner.peak_rows == 1
    assert idle(runner).cells_reserved == 0


def test_a_failed_decode_fails_its_rows_and_the_loop_goes_on(make_runner, monkeypatch) -> None:
    runner = make_runner()
    real = runner.llama.decode
    calls = {"n": 0}

    def flaky(*args: object) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 3:
            raise DecodeError(-3)
        return real(*args)

    monkeypatch.setattr(runner.llama, "decode", flaky)
    failed = submit(runner, PROMPTS[0], rid="f").wait()
    assert failed.finish() == FinishReason.ERROR
    assert "llama_decode failed" in (failed.deltas[-1].error or "")
    assert submit(runner, PROMPTS[1], rid="ok").wait().finish() == FinishReason.LENGTH
    assert idle(runner).cells_reserved == 0 and runner.crashed is None


def test_a_pulled_gguf_is_served_by_the_backend_the_settings_name(settings, tiny_gguf: Path, tmp_path: Path) -> None:
    """The registry keeps the original GGUF beside its conversion; with ``gguf_backend`` set to
    llama.cpp the engine serves that file (its adapters on a torch runner beside it), else the
    conversion."""
    import asyncio

    from llmos.engine.local import LocalEngine
    from llmos.platform import Platform
    from llmos.registry.service import Lineage
    from tests.unit.test_adapters import make_lora

    async def answer_once(engine: LocalEngine, model: str = "tiny-gguf") -> list[int]:
        prompt = await engine.encode_chat(await engine.resolve(model), [{"role": "user", "content": "Hello there"}])
        params = SamplingParams(max_tokens=8, temperature=0.0)
        tokens: list[int] = []
        async for delta in engine.generate(GenerationRequest(f"g-{model}", model, prompt, params)):
            tokens.extend(delta.token_ids)
        return tokens

    async def answer(engine: LocalEngine, model: str = "tiny-gguf") -> list[int]:
        try:
            return await answer_once(engine, model)
        finally:
            await engine.shutdown()

    platform = Platform.open(settings)
    try:
        record = platform.registry.pull(f"file:{tiny_gguf}", name="tiny-gguf")
        assert record.extra["gguf_file"] == tiny_gguf.name
        assert (platform.registry.model_dir(record) / tiny_gguf.name).read_bytes() == tiny_gguf.read_bytes()
        served = LocalEngine(platform.registry, settings.model_copy(update={"gguf_backend": "llama.cpp"}))
        by_llama = asyncio.run(answer(served))
        assert served.stats()["models"] == {}  # shut down
        converted = LocalEngine(platform.registry, settings)
        by_torch = asyncio.run(answer(converted))
        assert len(by_llama) == 8
        assert by_llama == by_torch  # float32 weights both ways: the same greedy tokens
        # A LoRA adapter of it runs on a torch runner of the same model, loaded beside llama.cpp's.
        adapter_dir = make_lora(platform.registry.model_dir(record), tmp_path / "lora", seed=3)
        platform.registry.pull(f"file:{adapter_dir}", name="tiny-gguf-lora", lineage=Lineage(parent_id=record.id))
        served = LocalEngine(platform.registry, settings.model_copy(update={"gguf_backend": "llama.cpp"}))

        async def both() -> tuple[list[int], list[int], dict[str, Any]]:
            adapted, base = await asyncio.gather(answer_once(served, "tiny-gguf-lora"), answer_once(served))
            stats = served.stats()["models"]
            await served.shutdown()
            return adapted, base, stats

        adapted, base, stats = asyncio.run(both())
        assert base == by_llama
        assert adapted == asyncio.run(answer(LocalEngine(platform.registry, settings), "tiny-gguf-lora"))
        assert adapted != by_torch  # the adapter changes the answer
        assert sorted(entry.get("backend", "torch") for entry in stats.values()) == ["llama.cpp", "torch"]
        assert [entry.get("serves") for entry in stats.values() if "serves" in entry] == ["adapters"]
    finally:
        platform.close()


def test_a_cache_out_of_room_forgets_cached_prefixes_and_goes_on(make_runner, reference, monkeypatch) -> None:
    runner = make_runner()
    submit(runner, list(range(100, 140)), rid="cached").wait()
    idle(runner)
    assert len(runner._cached) == 1
    real = runner.llama.decode
    calls = {"n": 0}

    def full_once(*args: object) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 1:
            raise DecodeError(1)  # llama.cpp found no free cells; the cache is as it was
        return real(*args)

    monkeypatch.setattr(runner.llama, "decode", full_once)
    prompt = list(range(1, 21))  # long enough to be kept as a cached prefix in its turn
    sink = submit(runner, prompt, rid="after").wait()
    assert sink.finish() == FinishReason.LENGTH
    np.testing.assert_allclose(sink.logprobs(), teacher_forced(reference, prompt, sink.tokens()), atol=2e-3)
    assert calls["n"] > 1 and idle(runner).cells_reserved == 0
    assert [c.tokens[: len(prompt)] for c in runner._cached] == [prompt]  # the old prefix was forgotten


def test_requests_it_cannot_run_are_refused_before_they_are_queued(make_runner) -> None:
    runner = make_runner(max_batch_size=4)
    for request, code in (
        (GenerationRequest("e", "tiny", [], SamplingParams()), "empty_prompt"),
        (GenerationRequest("n", "tiny", PROMPTS[0], SamplingParams(n=5)), None),
        (GenerationRequest("l", "tiny", list(range(1, 300)), SamplingParams(max_tokens=4)), "context_length_exceeded"),
    ):
        with pytest.raises(InvalidRequestError) as refused:
            runner.check_fits(request)
        assert refused.value.code == code


def test_a_crashed_loop_reports_and_frees_llama_cpp_s_memory(make_runner, monkeypatch) -> None:
    runner = make_runner()
    seen: list[BaseException] = []
    runner.on_crash = seen.append

    def broken() -> list[object]:
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(runner, "_plan_prefill", broken)
    runner.submit(GenerationRequest("x", "tiny", PROMPTS[0], SamplingParams(max_tokens=4)), Collector())
    runner._thread.join(30)
    assert isinstance(runner.crashed, RuntimeError) and seen == [runner.crashed]
    assert runner.llama._ctx is None and runner.llama._model is None


def test_a_request_whose_sampling_fails_fails_alone(make_runner, reference, monkeypatch) -> None:
    from llmos.engine import choices

    real = choices.select_tokens

    def poisoned(logits, sampling, fixed=None):  # type: ignore[no-untyped-def]
        if bool((sampling.temperature == 0.5).any()):
            raise RuntimeError("probability tensor contains nan")
        return real(logits, sampling, fixed)

    monkeypatch.setattr(choices, "select_tokens", poisoned)
    runner = make_runner()
    bad = submit(runner, PROMPTS[1], rid="bad", temperature=0.5)
    good = submit(runner, PROMPTS[0], rid="good")
    assert bad.wait().finish() == FinishReason.ERROR
    assert good.wait().finish() == FinishReason.LENGTH
    np.testing.assert_allclose(good.logprobs(), teacher_forced(reference, PROMPTS[0], good.tokens()), atol=2e-3)
    assert idle(runner).cells_reserved == 0
