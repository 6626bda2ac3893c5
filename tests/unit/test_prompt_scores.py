"""Prompt scoring in the engine: prompt logprobs equal a transformers forward of the same weights,
chunked or not, through the prefix cache or not, for the base and for a LoRA adapter in one batch."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmos.engine import GenerationRequest, SamplingParams
from llmos.engine.local import LocalEngine
from llmos.engine.protocol import FinishReason, PromptLogprob
from llmos.engine.torch_backend import CausalRunner
from llmos.engine.torch_backend.prefix_cache import BLOCK
from llmos.platform import Platform
from llmos.registry.service import Lineage
from tests.unit.test_adapters import make_lora, merged_reference

TEXTS = [
    "The capital of France is Paris. A quick brown fox jumps over the lazy dog.",
    "Hello, how are you today? Language models predict the next token.",
]
K = 3
BF16_TOLERANCE = 0.02
"""Prompt logprobs of bf16 weights against a transformers bf16 forward (ADR 0013)."""


def reference(model: Any, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt token's logprob after the first, and every position's log-softmax."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    return lp[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0], lp[:-1]


def assert_matches(scored: tuple[PromptLogprob, ...], model: Any, prompt: list[int]) -> None:
    token_lp, full = reference(model, prompt)
    assert [s.token_id for s in scored] == prompt
    assert scored[0].logprob is None and scored[0].rank is None
    got = torch.tensor([s.logprob for s in scored[1:]])
    assert torch.allclose(got, token_lp, atol=1e-3), (got - token_lp).abs().max()
    for i, s in enumerate(scored[1:]):
        assert s.rank == int((full[i] > full[i, prompt[i + 1]]).sum()) + 1
        top = full[i].topk(K)
        assert [t for t, _, _ in s.top] == top.indices.tolist()
        assert torch.allclose(torch.tensor([v for _, _, v in s.top]), top.values, atol=1e-3)


async def score(engine: LocalEngine, model: str, prompt: list[int], rid: str, **params: Any) -> Any:
    """(prompt scores, generated tokens, their logprobs, finish reason) of one choice."""
    sampling = SamplingParams(**({"max_tokens": 0, "temperature": 0.0, "prompt_logprobs": K} | params))
    scored: tuple[PromptLogprob, ...] = ()
    tokens: list[int] = []
    logprobs: list[float] = []
    finish = None
    async for delta in engine.generate(GenerationRequest(rid, model, prompt, sampling, tenant="t")):
        assert delta.error is None, delta.error
        scored = scored or delta.prompt_logprobs
        tokens.extend(delta.token_ids)
        logprobs.extend(t.logprob for t in delta.logprobs)
        finish = delta.finish_reason or finish
    return scored, tokens, logprobs, finish


@pytest.mark.parametrize(("chunk", "lean"), [(256, True), (7, True), (7, False)])
def test_prompt_logprobs_equal_a_transformers_forward(
    loaded_platform: Platform, tiny_chat_dir: Path, chunk: int, lean: bool
) -> None:
    """Whole prompts or chunks of 7 tokens, packed through the lean layers or one by one through
    the model's own forward (architectures without a lean step)."""
    settings = loaded_platform.settings.model_copy(update={"prefill_chunk_tokens": chunk})
    engine = LocalEngine(loaded_platform.registry, settings)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()

    async def main() -> None:
        handle = await engine.resolve("tiny-chat")
        base_id = loaded_platform.registry.get("tiny-chat").id
        runner = engine.residency.acquire(base_id)
        assert isinstance(runner, CausalRunner) and runner.decoder is not None
        if not lean:
            runner.decoder = None
        prompts = [await engine.encode_text(handle, t) for t in TEXTS]
        results = await asyncio.gather(*(score(engine, "tiny-chat", p, f"s{i}") for i, p in enumerate(prompts)))
        for prompt, (scored, tokens, _, finish) in zip(prompts, results, strict=True):
            assert tokens == [] and finish == FinishReason.LENGTH  # max_tokens 0: scored, nothing generated
            assert_matches(scored, model, prompt)
        engine.residency.release(base_id)
        await engine.shutdown()

    asyncio.run(main())


def test_a_generated_token_scores_as_it_was_generated(loaded_platform: Platform) -> None:
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)

    async def main() -> None:
        prompt = await engine.encode_text(await engine.resolve("tiny-chat"), TEXTS[0])
        _, tokens, logprobs, _ = await score(engine, "tiny-chat", prompt, "g", max_tokens=4, logprobs=True)
        scored, _, _, _ = await score(engine, "tiny-chat", prompt + tokens, "s")
        assert len(tokens) == 4
        prompt_part = [s.logprob for s in scored[len(prompt) :]]
        assert torch.allclose(torch.tensor(prompt_part), torch.tensor(logprobs), atol=1e-4)
        await engine.shutdown()

    asyncio.run(main())


def test_a_scored_context_is_computed_once_for_several_continuations(
    loaded_platform: Platform, tiny_chat_dir: Path
) -> None:
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()

    async def main() -> None:
        handle = await engine.resolve("tiny-chat")
        context = await engine.encode_text(handle, " ".join(TEXTS))
        assert len(context) > 2 * BLOCK
        endings = [await engine.encode_text(handle, t) for t in (" Yes", " No, it is not")]
        base_id = loaded_platform.registry.get("tiny-chat").id
        runner = engine.residency.acquire(base_id)
        assert isinstance(runner, CausalRunner)
        await score(engine, "tiny-chat", context + endings[0], "a")
        computed = runner.prefill_tokens
        scored, _, _, _ = await score(engine, "tiny-chat", context + endings[1], "b")
        reused = runner.prefix_cache.tokens_reused
        assert reused >= 2 * BLOCK  # the context's blocks, with their scores, came from the cache
        assert runner.prefill_tokens - computed == len(context + endings[1]) - reused + 1
        assert_matches(scored, model, context + endings[1])
        engine.residency.release(base_id)
        await engine.shutdown()

    asyncio.run(main())


def test_an_adapter_scores_with_its_own_weights_beside_the_base(
    loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    base = loaded_platform.registry.get("tiny-chat")
    directory = make_lora(tiny_chat_dir, tmp_path / "ad", seed=3)
    loaded_platform.registry.pull(f"file:{directory}", name="ad", lineage=Lineage(parent_id=base.id))
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)
    plain = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()

    async def main() -> None:
        prompt = await engine.encode_text(await engine.resolve("tiny-chat"), TEXTS[1])
        (adapted, *_), (own, *_) = await asyncio.gather(
            score(engine, "ad", prompt, "a"), score(engine, "tiny-chat", prompt, "b")
        )
        assert_matches(adapted, merged_reference(tiny_chat_dir, directory), prompt)
        assert_matches(own, plain, prompt)
        assert [s.logprob for s in adapted[1:]] != [s.logprob for s in own[1:]]
        await engine.shutdown()

    asyncio.run(main())


def test_bf16_prompt_logprobs_equal_a_bf16_forward_within_the_adrs_tolerance(
    loaded_platform: Platform, tiny_chat_dir: Path
) -> None:
    """bf16 weights: within ``BF16_TOLERANCE`` of transformers' bf16 forward (ADR 0013), two prompts
    packed into one pass."""
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings.model_copy(update={"dtype": "bfloat16"}))
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.bfloat16).eval()

    async def main() -> None:
        handle = await engine.resolve("tiny-chat")
        prompts = [await engine.encode_text(handle, t) for t in TEXTS]
        results = await asyncio.gather(*(score(engine, "tiny-chat", p, f"s{i}") for i, p in enumerate(prompts)))
        for prompt, (scored, *_) in zip(prompts, results, strict=True):
            expected, _ = reference(model, prompt)
            got = torch.tensor([s.logprob for s in scored[1:]])
            assert torch.allclose(got, expected, atol=BF16_TOLERANCE), (got - expected).abs().max()
        await engine.shutdown()

    asyncio.run(main())
