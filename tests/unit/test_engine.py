"""The PyTorch backend on a tiny random Llama: batching, sampling parameters, abort."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmos.engine import FinishReason, GenerationRequest, SamplingParams
from llmos.engine.local import LocalEngine
from llmos.engine.runner import GenerationRunner
from llmos.platform import Platform


@pytest.fixture
def engine(loaded_platform: Platform) -> LocalEngine:
    return LocalEngine(loaded_platform.registry, loaded_platform.settings)


async def _run(
    engine: LocalEngine, prompt: list[int], rid: str = "r", **params: object
) -> tuple[dict[int, list[int]], dict[int, FinishReason | None]]:
    tokens: dict[int, list[int]] = {}
    reasons: dict[int, FinishReason | None] = {}
    async for d in engine.generate(GenerationRequest(rid, "tiny-chat", prompt, SamplingParams(**params))):  # type: ignore[arg-type]
        tokens.setdefault(d.index, []).extend(d.token_ids)
        if d.finish_reason:
            reasons[d.index] = d.finish_reason
    return tokens, reasons


def test_greedy_matches_transformers_generate(engine: LocalEngine, tiny_chat_dir: Path) -> None:
    async def main() -> None:
        prompt = await engine.encode_chat(
            await engine.resolve("tiny-chat"), [{"role": "user", "content": "Hello there"}]
        )
        tokens, reasons = await _run(engine, prompt, max_tokens=12, temperature=0.0)
        model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32)
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :]
        expected = [t for t in reference.tolist() if t != model.config.eos_token_id][: len(tokens[0])]
        assert tokens[0] == expected
        assert reasons[0] in (FinishReason.LENGTH, FinishReason.STOP)
        await engine.shutdown()

    asyncio.run(main())


def test_concurrent_requests_share_a_batch_and_match_solo_runs(engine: LocalEngine) -> None:
    async def main() -> None:
        prompts = [
            await engine.encode_text(await engine.resolve("tiny-chat"), t)
            for t in ("Hello", "The capital of France is", "A")
        ]
        solo = [(await _run(engine, p, f"solo{i}", max_tokens=8, temperature=0.0))[0][0] for i, p in enumerate(prompts)]
        runner = engine.residency.acquire(engine.registry.get("tiny-chat").id)
        together = await asyncio.gather(
            *[_run(engine, p, f"b{i}", max_tokens=8, temperature=0.0) for i, p in enumerate(prompts)]
        )
        engine.residency.release(engine.registry.get("tiny-chat").id)
        assert [t[0][0] for t in together] == solo
        assert runner.peak_rows == 3  # decoded together, not one after another
        await engine.shutdown()

    asyncio.run(main())


def test_a_request_joins_a_running_batch_and_leaves_before_it(engine: LocalEngine) -> None:
    """Iteration-level scheduling: a short request admitted mid-flight finishes first, and the
    answers of both equal their solo answers (left padding and cache merging are exact)."""

    async def main() -> None:
        long_prompt = await engine.encode_text(
            await engine.resolve("tiny-chat"), "Write a short poem about the sea and the stars."
        )
        short_prompt = await engine.encode_text(await engine.resolve("tiny-chat"), "Hello")
        solo_long = (await _run(engine, long_prompt, "solo-long", max_tokens=60, temperature=0.0))[0][0]
        solo_short = (await _run(engine, short_prompt, "solo-short", max_tokens=5, temperature=0.0))[0][0]
        order: list[str] = []
        long_tokens: list[int] = []
        short_started = asyncio.Event()

        async def long_request() -> None:
            gen = engine.generate(
                GenerationRequest("long", "tiny-chat", long_prompt, SamplingParams(max_tokens=60, temperature=0.0))
            )
            async for d in gen:
                long_tokens.extend(d.token_ids)
                if len(long_tokens) == 3:
                    short_started.set()
            order.append("long")

        async def short_request() -> list[int]:
            await short_started.wait()
            tokens, _ = await _run(engine, short_prompt, "short", max_tokens=5, temperature=0.0)
            order.append("short")
            return tokens[0]

        _, short_tokens = await asyncio.gather(long_request(), short_request())
        assert order == ["short", "long"]
        assert short_tokens == solo_short
        assert long_tokens == solo_long
        await engine.shutdown()

    asyncio.run(main())


def test_n_choices_with_seed_are_reproducible_and_length_limited(engine: LocalEngine) -> None:
    async def main() -> None:
        prompt = await engine.encode_text(await engine.resolve("tiny-chat"), "Hello")
        a, _ = await _run(engine, prompt, "a", n=3, seed=11, temperature=1.0, max_tokens=5)
        b, _ = await _run(engine, prompt, "b", n=3, seed=11, temperature=1.0, max_tokens=5)
        assert a == b
        assert sorted(a) == [0, 1, 2]
        assert all(len(v) <= 5 for v in a.values())
        assert len({tuple(v) for v in a.values()}) > 1  # choices differ from each other
        await engine.shutdown()

    asyncio.run(main())


def test_abandoned_stream_stops_generation(engine: LocalEngine) -> None:
    async def main() -> None:
        prompt = await engine.encode_text(await engine.resolve("tiny-chat"), "Hello")
        model_id = engine.registry.get("tiny-chat").id
        runner = engine.residency.acquire(model_id)
        engine.residency.release(model_id)
        assert isinstance(runner, GenerationRunner)
        # temperature 2 and no eos: generation would run the full 200 tokens.
        gen = engine.generate(
            GenerationRequest("gone", "tiny-chat", prompt, SamplingParams(max_tokens=200, temperature=2.0, seed=1))
        )
        await gen.__anext__()
        await gen.aclose()
        for _ in range(500):
            if not runner.busy:
                break
            await asyncio.sleep(0.01)
        assert not runner.busy
        generated = runner.tokens_generated  # every token computed, for whoever asked
        assert generated < 100
        await asyncio.sleep(0.2)
        assert runner.tokens_generated == generated
        await engine.shutdown()

    asyncio.run(main())


def test_embeddings_are_normalised_mean_pooled(engine: LocalEngine) -> None:
    async def main() -> None:
        result = await engine.embed(await engine.resolve("tiny-embed"), ["hello world", "the sea"])
        vectors = torch.tensor(result.vectors)
        assert vectors.shape == (2, 32)
        assert torch.allclose(vectors.norm(dim=-1), torch.ones(2), atol=1e-5)
        single = await engine.embed(await engine.resolve("tiny-embed"), ["hello world"])
        assert torch.allclose(torch.tensor(single.vectors[0]), vectors[0], atol=1e-5)  # padding does not leak
        await engine.shutdown()

    asyncio.run(main())


def test_concurrent_embedding_requests_share_one_forward_pass(engine: LocalEngine) -> None:
    import threading
    import time

    from llmos.engine.torch_backend import EncoderRunner

    texts = [["hello world"], ["the sea", "a quick brown fox jumps"], ["stars"], ["Paris is the capital of France"]]
    model_id = engine.registry.get("tiny-embed").id
    with engine.residency.use(model_id) as runner:
        assert isinstance(runner, EncoderRunner)
        solo = [runner.embed(t).vectors for t in texts]
        results: dict[int, list[list[float]]] = {}
        before = runner.forwards
        with runner._lock:  # busy: the requests below queue up behind the running forward
            threads = [
                threading.Thread(target=lambda i=i: results.update({i: runner.embed(texts[i]).vectors}))
                for i in range(4)
            ]
            for t in threads:
                t.start()
            while len(runner._queue) < 4:
                time.sleep(0.01)
        for t in threads:
            t.join()
        assert runner.forwards - before == 1  # four requests, one combined forward pass
        for i, vectors in enumerate(solo):
            torch.testing.assert_close(torch.tensor(results[i]), torch.tensor(vectors), atol=1e-5, rtol=1e-4)
    asyncio.run(engine.shutdown())


def test_full_engine_refuses_at_once_with_retry_after(loaded_platform: Platform) -> None:
    """Admission control: beyond max_pending_requests a request is refused immediately (503 +
    Retry-After at the edge), instead of piling up."""
    from llmos.errors import ServiceUnavailableError

    settings = loaded_platform.settings.model_copy(update={"max_pending_requests": 1})
    engine = LocalEngine(loaded_platform.registry, settings)

    async def main() -> None:
        prompt = await engine.encode_text(await engine.resolve("tiny-chat"), "Hello")
        first = engine.generate(
            GenerationRequest("one", "tiny-chat", prompt, SamplingParams(max_tokens=100, temperature=1.0, seed=1))
        )
        await first.__anext__()
        second = engine.generate(GenerationRequest("two", "tiny-chat", prompt, SamplingParams(max_tokens=2)))
        with pytest.raises(ServiceUnavailableError) as exc:
            await second.__anext__()
        assert exc.value.retry_after >= 1
        await first.aclose()
        tokens, _ = await _run(engine, prompt, "three", max_tokens=2)  # room again once the first is gone
        assert tokens
        await engine.shutdown()

    asyncio.run(main())
