"""Prefix- and prompt-tuning adapters served beside their base as virtual key/value states:
registration, exactness against PEFT, mixed batches with LoRA adapters, refusals."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from llmos.engine import GenerationRequest, SamplingParams
from llmos.engine.local import LocalEngine
from llmos.engine.torch_backend import CausalRunner
from llmos.errors import ArtifactError
from llmos.platform import Platform
from llmos.registry.service import Lineage
from tests.unit.test_adapters import _greedy, make_lora

METHODS = {
    "prefix": lambda: PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    "prompt": lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
}


def make_virtual(base_dir: Path, out: Path, method: str, *, seed: int) -> Path:
    """A random prompt-learning adapter for the tiny chat model, saved the way PEFT saves it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, METHODS[method]())
    with torch.no_grad():  # large enough to change greedy tokens
        for param in peft_model.prompt_encoder.parameters():
            param.normal_(0, 2.0)
    peft_model.save_pretrained(out)
    return out


def peft_greedy(base_dir: Path, adapter_dir: Path, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """PEFT's own greedy tokens for ``prompt`` and the log-probability of the first one."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    # Greedy by PEFT's forward over the whole sequence each step, not ``generate``: with
    # transformers 5.24, PEFT 0.21's generate hands prefix tuning's states over as the deprecated
    # ``past_key_values`` beside the ``cache`` generate makes, and transformers drops them.
    tokens: list[int] = []
    first = 0.0
    with torch.no_grad():
        for step in range(max_tokens):
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1], -1)
            if step == 0:
                first = logprobs.max().item()
            tokens.append(int(logprobs.argmax()))
    eos = base.config.eos_token_id
    return (tokens[: tokens.index(eos)] if eos in tokens else tokens), first


@pytest.fixture
def virtual_adapters(loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path) -> dict[str, Path]:
    base = loaded_platform.registry.get("tiny-chat")
    made = {}
    for i, method in enumerate(METHODS):
        directory = make_virtual(tiny_chat_dir, tmp_path / method, method, seed=20 + i)
        loaded_platform.registry.pull(f"file:{directory}", name=method, lineage=Lineage(parent_id=base.id))
        made[method] = directory
    return made


def test_prompt_learning_adapters_are_registered_as_children_of_their_base(
    loaded_platform: Platform, virtual_adapters: dict[str, Path]
) -> None:
    base = loaded_platform.registry.get("tiny-chat")
    for name in virtual_adapters:
        record = loaded_platform.registry.get(name)
        assert (record.format, record.task, record.parent_id) == ("prefix", "chat", base.id)
    assert {r.name for r in loaded_platform.registry.adapters_of(base.id)} == set(virtual_adapters)


@pytest.mark.parametrize("method", list(METHODS))
def test_output_equals_peft(
    loaded_platform: Platform, virtual_adapters: dict[str, Path], tiny_chat_dir: Path, method: str
) -> None:
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)

    async def main() -> tuple[list[int], list[int], float, float]:
        prompt = await engine.encode_chat(await engine.resolve(method), [{"role": "user", "content": "Hello there"}])
        got = await _greedy(engine, method, prompt, "r1", max_tokens=8)
        again = await _greedy(engine, method, prompt, "r2", max_tokens=8)  # from the cached states
        assert len(got) > 0 and got == again
        with_tokens = await _first_logprob(engine, method, prompt)
        plain = await _first_logprob(engine, "tiny-chat", prompt)
        await engine.shutdown()
        return prompt, got, with_tokens, plain

    prompt, got, with_tokens, plain = asyncio.run(main())
    expected, expected_logprob = peft_greedy(tiny_chat_dir, virtual_adapters[method], prompt, 8)
    assert got == expected[: len(got)]
    assert with_tokens == pytest.approx(expected_logprob, abs=1e-4)
    assert abs(with_tokens - plain) > 1e-3  # the virtual tokens really change the distribution


async def _first_logprob(engine: LocalEngine, model: str, prompt: list[int]) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=True)
    async for delta in engine.generate(GenerationRequest(f"lp-{model}", model, prompt, params)):
        if delta.logprobs:
            return delta.logprobs[0].logprob
    raise AssertionError("no logprob returned")


def test_virtual_lora_and_base_rows_share_one_batch(
    loaded_platform: Platform, virtual_adapters: dict[str, Path], tiny_chat_dir: Path, tmp_path: Path
) -> None:
    base = loaded_platform.registry.get("tiny-chat")
    lora_dir = make_lora(tiny_chat_dir, tmp_path / "lora", seed=5)
    loaded_platform.registry.pull(f"file:{lora_dir}", name="lora", lineage=Lineage(parent_id=base.id))
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)

    async def main() -> None:
        models = ["prefix", "tiny-chat", "prompt", "lora", "prefix"]
        prompts = [
            await engine.encode_text(await engine.resolve("tiny-chat"), t)
            for t in ("Hello", "The capital", "A quick", "Hi", "Go")
        ]
        solo = [await _greedy(engine, m, p, f"solo{i}") for i, (m, p) in enumerate(zip(models, prompts, strict=True))]
        runner = engine.residency.acquire(base.id)
        assert isinstance(runner, CausalRunner)
        runner.peak_rows = 0
        together = await asyncio.gather(
            *[_greedy(engine, m, p, f"mix{i}") for i, (m, p) in enumerate(zip(models, prompts, strict=True))]
        )
        engine.residency.release(base.id)
        assert together == solo
        assert runner.peak_rows == len(models)
        assert engine.residency.resident() == [base.id]
        assert sorted(engine.stats()["models"][base.id]["adapters"]) == ["lora", "prefix", "prompt"]
        info = (await engine.resolve("prefix")).info
        assert info.context_length == (base.context_length or 2048) - 6  # the virtual tokens take positions
        await engine.shutdown()

    asyncio.run(main())


def _rewrite(directory: Path, change: dict[str, Any]) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 10**6}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 7}, "shape"),  # the weights hold 6
        ({"num_transformer_submodules": 2}, "encoder-decoder"),
        ({"peft_type": "P_TUNING"}, "merge it"),
    ],
)
def test_adapters_that_do_not_fit_are_refused(
    loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path, change: dict, message: str
) -> None:
    directory = make_virtual(tiny_chat_dir, tmp_path / "bad", "prefix", seed=1)
    _rewrite(directory, change)
    base = loaded_platform.registry.get("tiny-chat")
    with pytest.raises(ArtifactError, match=message):
        loaded_platform.registry.pull(f"file:{directory}", name="bad", lineage=Lineage(parent_id=base.id))
    assert not any(r.name == "bad" for r in loaded_platform.registry.list())


def test_prefix_trained_on_another_base_is_refused(
    loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    config = AutoConfig.from_pretrained(tiny_chat_dir)
    config.num_hidden_layers += 1  # a deeper model: its prefix holds states for one more layer
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "deeper-base")
    directory = make_virtual(tmp_path / "deeper-base", tmp_path / "deeper", "prefix", seed=2)
    base = loaded_platform.registry.get("tiny-chat")
    with pytest.raises(ArtifactError, match="another base"):
        loaded_platform.registry.pull(f"file:{directory}", name="deeper", lineage=Lineage(parent_id=base.id))
