"""The engine's key/value cache budget and chunked prefill, on the tiny chat model."""

from __future__ import annotations

import asyncio

import pytest
import torch
from fastapi.testclient import TestClient

from llmos.engine import FinishReason, GenerationRequest, SamplingParams
from llmos.engine.local import LocalEngine
from llmos.engine.torch_backend import CausalRunner
from llmos.engine.torch_backend.kv_budget import KvBudget
from llmos.errors import InvalidRequestError
from llmos.platform import Platform
from tests.conftest import ADMIN_KEY
from tests.unit.test_engine import _run


def _runner(engine: LocalEngine) -> CausalRunner:
    runner = engine.residency.acquire(engine.registry.get("tiny-chat").id)
    engine.residency.release(engine.registry.get("tiny-chat").id)
    assert isinstance(runner, CausalRunner)
    return runner


def test_budget_bounds_rows_times_the_longest_reservation() -> None:
    budget = KvBudget(budget_bytes=1000, bytes_per_token=10)  # 100 tokens
    assert budget.fits([]) and budget.fits([50, 20]) and budget.fits([25] * 4)
    assert not budget.fits([50, 20, 10])  # 3 rows padded to 50 tokens each
    assert not budget.fits([101])


def test_requests_wait_for_room_in_the_cache_and_all_finish(loaded_platform: Platform) -> None:
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)

    async def main() -> None:
        prompts = [
            await engine.encode_text(await engine.resolve("tiny-chat"), t)
            for t in ("Hello", "The capital", "A quick", "Write me")
        ]
        solo = [(await _run(engine, p, f"solo{i}", max_tokens=6, temperature=0.0))[0][0] for i, p in enumerate(prompts)]
        runner = _runner(engine)
        longest = max(len(p) for p in prompts) + 6
        runner.kv_budget.budget_bytes = runner.kv_budget.bytes_for([longest] * 2)  # two rows at most
        runner.peak_rows = 0
        together = await asyncio.gather(
            *[_run(engine, p, f"b{i}", max_tokens=6, temperature=0.0) for i, p in enumerate(prompts)]
        )
        assert [t[0][0] for t in together] == solo  # the ones that waited lost nothing
        assert all(t[1][0] in (FinishReason.LENGTH, FinishReason.STOP) for t in together)
        # Two of the longest fit; three of the shorter ones may, when they happen to arrive first.
        assert 2 <= runner.peak_rows < len(prompts)
        while runner.busy:  # the engine thread finishes its last step after the final tokens are sent
            await asyncio.sleep(0.01)
        assert engine.stats()["models"][engine.registry.get("tiny-chat").id]["kv_cache_bytes"] == 0  # all left
        await engine.shutdown()

    asyncio.run(main())


def test_a_request_that_can_never_fit_is_refused_before_it_is_queued(loaded_platform: Platform) -> None:
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)

    async def main() -> None:
        prompt = await engine.encode_text(await engine.resolve("tiny-chat"), "Hello")
        runner = _runner(engine)
        runner.kv_budget.budget_bytes = runner.kv_budget.bytes_for([len(prompt) + 30])  # one row, not two
        request = GenerationRequest("big", "tiny-chat", prompt, SamplingParams(max_tokens=30, n=2))
        with pytest.raises(InvalidRequestError, match="key/value cache") as caught:
            async for _ in engine.generate(request):
                pass
        assert caught.value.code == "kv_cache_exceeded"
        _, reasons = await _run(engine, prompt, "fits", max_tokens=30)  # alone it fits, and still runs
        assert reasons[0] in (FinishReason.LENGTH, FinishReason.STOP)
        assert engine.stats()["pending_requests"] == 0
        await engine.shutdown()

    asyncio.run(main())


def test_refusal_through_the_api_has_the_openai_shape(http: TestClient) -> None:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 40}
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    assert http.post("/v1/chat/completions", json=body, headers=headers).status_code == 200  # loads the model
    engine = http.app.state.engine  # type: ignore[attr-defined]
    runner = _runner(engine)
    runner.kv_budget.budget_bytes = runner.kv_budget.bytes_for([20])
    response = http.post("/v1/chat/completions", json=body, headers=headers)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("kv_cache_exceeded", "max_tokens")
    assert error["type"] == "invalid_request_error"
    assert http.get("/health").status_code == 200


def test_a_long_prompt_is_prefilled_in_chunks_between_decode_steps(loaded_platform: Platform) -> None:
    settings = loaded_platform.settings.model_copy(update={"prefill_chunk_tokens": 8})
    engine = LocalEngine(loaded_platform.registry, settings)

    async def main() -> None:
        short = await engine.encode_text(await engine.resolve("tiny-chat"), "Hello")
        long = await engine.encode_text(await engine.resolve("tiny-chat"), " ".join(["the quick brown fox"] * 40))
        assert len(long) > 100
        unchunked = LocalEngine(loaded_platform.registry, loaded_platform.settings)
        expected, _ = await _run(unchunked, long, "ref", max_tokens=5, temperature=0.0)
        await unchunked.shutdown()
        order: list[str] = []

        async def follow(rid: str, prompt: list[int], max_tokens: int) -> list[int]:
            out: list[int] = []
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
            async for delta in engine.generate(GenerationRequest(rid, "tiny-chat", prompt, params)):
                out.extend(delta.token_ids)
                order.append(rid)
            return out

        first = asyncio.create_task(follow("short", short, 60))
        while "short" not in order:  # the short request is decoding
            await asyncio.sleep(0.01)
        before = order.count("short")
        got = await follow("long", long, 5)
        await first
        runner = _runner(engine)
        # While the long prompt was prefilled chunk by chunk, the running stream kept getting tokens.
        assert order[: order.index("long")].count("short") - before >= len(long) // 8 - 2
        assert got == expected[0]  # chunking changes nothing in what is computed
        assert runner.prefill_tokens == len(short) + len(long)
        await engine.shutdown()

    asyncio.run(main())


def test_each_row_counts_its_own_buffers_and_a_layer_in_copy() -> None:
    # 3 tokens of per-row buffers (25 bytes rounded up), and one of 4 layers being copied at a time.
    budget = KvBudget(budget_bytes=250, bytes_per_token=10, row_overhead_bytes=25, layers=4)
    assert budget.tokens_for([7, 5]) == 2 * (7 + 3) * 1.25
    assert budget.fits([7, 5]) and not budget.fits([7, 5, 1])
    assert budget.bytes_for([7, 5]) == 250


def test_a_growing_cache_keeps_no_room_past_its_limit() -> None:
    from transformers import LlamaConfig

    from llmos.engine.torch_backend.kv_cache import GrowingLayer, limit_growth, new_cache

    config = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    cache = new_cache(config)
    limit_growth(cache, 40)
    layer = cache.layers[0]
    assert isinstance(layer, GrowingLayer)
    for _ in range(40):
        layer.update(torch.zeros(1, 2, 1, 8), torch.zeros(1, 2, 1, 8))
    assert layer._keys.buffer is not None and layer._keys.buffer.shape[2] == 40  # unlimited: 39 + 32 spare
