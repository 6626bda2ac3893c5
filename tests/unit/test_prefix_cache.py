"""Prefix caching: a shared system prompt is computed once per tenant, and answers do not change."""

from __future__ import annotations

import asyncio

import torch

from llmos.engine import GenerationRequest, SamplingParams
from llmos.engine.local import LocalEngine
from llmos.engine.torch_backend import CausalRunner
from llmos.engine.torch_backend.prefix_cache import BLOCK, PrefixCache
from llmos.platform import Platform

SYSTEM = "You are a helpful assistant. " * 6


async def _greedy(engine: LocalEngine, prompt: list[int], rid: str, tenant: str) -> list[int]:
    out: list[int] = []
    request = GenerationRequest(rid, "tiny-chat", prompt, SamplingParams(max_tokens=8, temperature=0.0), tenant=tenant)
    async for delta in engine.generate(request):
        out.extend(delta.token_ids)
    return out


def test_a_shared_system_prompt_is_prefilled_once_per_tenant(loaded_platform: Platform) -> None:
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)

    async def main() -> None:
        chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in ("Hello", "Paris?")]
        prompts = [await engine.encode_chat(await engine.resolve("tiny-chat"), chat) for chat in chats]
        base_id = engine.registry.get("tiny-chat").id
        runner = engine.residency.acquire(base_id)
        assert isinstance(runner, CausalRunner)
        first = await _greedy(engine, prompts[0], "a1", "acme")
        computed = runner.prefill_tokens
        assert computed == len(prompts[0])
        second = await _greedy(engine, prompts[1], "a2", "acme")
        reused = runner.prefix_cache.tokens_reused
        assert reused >= BLOCK and reused % BLOCK == 0  # the system prompt's full blocks came from the cache
        assert runner.prefill_tokens - computed == len(prompts[1]) - reused
        other = await _greedy(engine, prompts[1], "b1", "globex")  # another tenant: computed from scratch
        assert runner.prefix_cache.tokens_reused == reused
        assert other == second

        runner.prefix_cache.budget_bytes = 0  # the answers are those computed without any cache
        runner.prefix_cache.clear()
        assert await _greedy(engine, prompts[0], "c1", "acme") == first
        assert await _greedy(engine, prompts[1], "c2", "acme") == second
        engine.residency.release(base_id)
        await engine.shutdown()

    asyncio.run(main())


def test_prefix_cache_evicts_least_recently_used_within_its_budget(loaded_platform: Platform) -> None:
    from transformers import AutoModelForCausalLM, DynamicCache

    model = AutoModelForCausalLM.from_pretrained(
        loaded_platform.registry.model_dir(loaded_platform.registry.get("tiny-chat"))
    )
    prompts = [[(seed * 7 + i) % 300 + 3 for i in range(2 * BLOCK + 3)] for seed in range(3)]
    caches = []
    with torch.inference_mode():
        for prompt in prompts:
            cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True)
            caches.append(cache)
    one_entry = sum(layer.keys[:, :, : 2 * BLOCK].numel() * 4 * 2 for layer in caches[0].layers)
    prefixes = PrefixCache(budget_bytes=2 * one_entry)
    for prompt, cache in zip(prompts[:2], caches[:2], strict=True):
        prefixes.store("t", prompt, cache, row=0)
    hit = prefixes.lookup("t", prompts[0] + [1])  # 0 is now the most recently used
    assert hit is not None and hit[0] == 2 * BLOCK
    torch.testing.assert_close(hit[1][0][0], caches[0].layers[0].keys[:, :, : 2 * BLOCK])
    prefixes.store("t", prompts[2], caches[2], row=0)  # evicts prompt 1, not prompt 0
    assert prefixes.lookup("t", prompts[1]) is None
    assert prefixes.lookup("t", prompts[0]) is not None and prefixes.used_bytes <= prefixes.budget_bytes
    assert prefixes.lookup("another tenant", prompts[0]) is None
    short = prefixes.lookup("t", prompts[0][: BLOCK + 1])  # a shorter prompt reuses the first block
    assert short is not None and short[0] == BLOCK
