"""LoRA adapters served beside their base: registration, exactness, mixed batches, eviction, refusals."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from llmos.engine import GenerationRequest, SamplingParams
from llmos.engine.local import LocalEngine
from llmos.engine.torch_backend import CausalRunner
from llmos.errors import ArtifactError, ConflictError, ServiceUnavailableError
from llmos.platform import Platform
from llmos.registry.service import Lineage


def make_lora(base_dir: Path, out: Path, *, seed: int, r: int = 4, **config: Any) -> Path:
    """A random (non-zero) LoRA adapter for the tiny chat model, saved the way PEFT saves it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False, **config)
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # PEFT's random init leaves B at a scale too small to change greedy tokens
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(out)
    return out


def merged_reference(base_dir: Path, adapter_dir: Path) -> Any:
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


@pytest.fixture
def adapters(loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path) -> dict[str, Path]:
    base = loaded_platform.registry.get("tiny-chat")
    made = {}
    for i, name in enumerate(("ad-a", "ad-b", "ad-c")):
        extra = {"alpha_pattern": {"q_proj": 3}} if name == "ad-a" else {}  # a per-module scale, as PEFT allows
        directory = make_lora(tiny_chat_dir, tmp_path / name, seed=10 + i, **extra)
        loaded_platform.registry.pull(f"file:{directory}", name=name, lineage=Lineage(parent_id=base.id))
        made[name] = directory
    return made


async def _greedy(engine: LocalEngine, model: str, prompt: list[int], rid: str, max_tokens: int = 10) -> list[int]:
    out: list[int] = []
    request = GenerationRequest(rid, model, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    async for delta in engine.generate(request):
        assert delta.error is None, delta.error
        out.extend(delta.token_ids)
    return out


def test_adapter_is_registered_as_a_small_child_of_its_base(loaded_platform: Platform, adapters: dict) -> None:
    base = loaded_platform.registry.get("tiny-chat")
    record = loaded_platform.registry.get("ad-a")
    assert (record.format, record.task, record.parent_id, record.base_id) == ("lora", "chat", base.id, base.id)
    assert record.size_bytes < base.size_bytes
    assert {r.name for r in loaded_platform.registry.adapters_of(base.id)} == {"ad-a", "ad-b", "ad-c"}


def test_an_adapters_requests_are_not_speculated(loaded_platform: Platform, adapters: dict) -> None:
    """A LoRA adapter's rows decode one token at a time (a verify rounds their adapter products
    differently in float32), so its chat requests' ``prediction`` is refused, the base's taken."""
    from fastapi.testclient import TestClient

    from llmos.api import create_app
    from tests.conftest import ADMIN_KEY

    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)

    async def main() -> tuple[bool, bool]:
        base, adapter = await engine.resolve("tiny-chat"), await engine.resolve("ad-a")
        await engine.shutdown()
        return base.info.speculates, adapter.info.speculates

    assert asyncio.run(main()) == (True, False)
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}
    with TestClient(create_app(platform=loaded_platform)) as http:
        for model, status in (("tiny-chat", 200), ("ad-a", 400)):
            resp = http.post(
                "/v1/chat/completions",
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                json={**body, "model": model, "prediction": {"type": "content", "content": "Hello"}},
            )
            assert resp.status_code == status, resp.text
    assert resp.json()["error"]["param"] == "prediction" and "LoRA adapter" in resp.json()["error"]["message"]


def test_adapter_output_equals_the_merged_model(loaded_platform: Platform, adapters: dict, tiny_chat_dir: Path) -> None:
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)

    async def main() -> None:
        prompt = await engine.encode_chat(await engine.resolve("ad-a"), [{"role": "user", "content": "Hello there"}])
        got = await _greedy(engine, "ad-a", prompt, "r1")
        await engine.shutdown()
        model = merged_reference(tiny_chat_dir, adapters["ad-a"])
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :]
        expected = [t for t in reference.tolist() if t != model.config.eos_token_id][: len(got)]
        assert got == expected
        base_only = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32)
        plain = base_only.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :]
        assert plain.tolist()[: len(got)] != got  # the adapter really changes the output

    asyncio.run(main())


def test_mixed_adapters_share_one_batch_over_one_base(loaded_platform: Platform, adapters: dict) -> None:
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)

    async def main() -> None:
        models = ["tiny-chat", "ad-a", "ad-b", "ad-c", "ad-a"]
        prompts = [
            await engine.encode_text(await engine.resolve("tiny-chat"), t)
            for t in ("Hello", "The capital", "A quick", "Write", "Hi")
        ]
        solo = [await _greedy(engine, m, p, f"solo{i}") for i, (m, p) in enumerate(zip(models, prompts, strict=True))]
        base_id = loaded_platform.registry.get("tiny-chat").id
        runner = engine.residency.acquire(base_id)
        assert isinstance(runner, CausalRunner)
        runner.peak_rows = 0
        together = await asyncio.gather(
            *[_greedy(engine, m, p, f"mix{i}") for i, (m, p) in enumerate(zip(models, prompts, strict=True))]
        )
        engine.residency.release(base_id)
        assert together == solo  # each row got its own adapter (or none) inside the shared batch
        assert runner.peak_rows == len(models)
        assert engine.residency.resident() == [base_id]  # the base is loaded once for all adapters
        assert sorted(engine.stats()["models"][base_id]["adapters"]) == ["ad-a", "ad-b", "ad-c"]
        await engine.shutdown()

    asyncio.run(main())


def test_idle_adapters_are_evicted_least_recently_used(loaded_platform: Platform, adapters: dict) -> None:
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)
    base_id = engine.registry.get("tiny-chat").id
    runner = engine.residency.acquire(base_id)
    assert isinstance(runner, CausalRunner)
    one = loaded_platform.registry.get("ad-a")
    runner.lora.acquire(one.id, lambda shapes: engine._load_adapter(one, shapes))
    runner.lora.budget_bytes = runner.lora.used_bytes * 2  # room for two adapters
    for name in ("ad-b", "ad-c"):
        record = loaded_platform.registry.get(name)
        runner.lora.acquire(record.id, lambda shapes, r=record: engine._load_adapter(r, shapes))
        runner.lora.release(record.id)
    resident = {loaded_platform.registry.get(a).name for a in runner.lora.resident()}
    assert resident == {"ad-a", "ad-c"}  # ad-a is pinned (in use); idle ad-b made room for ad-c
    runner.lora.budget_bytes = runner.lora.used_bytes  # still room for two
    record = loaded_platform.registry.get("ad-b")
    runner.lora.acquire(record.id, lambda shapes: engine._load_adapter(record, shapes))  # evicts idle ad-c
    c = loaded_platform.registry.get("ad-c")
    with pytest.raises(ServiceUnavailableError):  # both resident adapters are in use: wait, do not crash
        runner.lora.acquire(c.id, lambda shapes: engine._load_adapter(c, shapes))
    engine.residency.release(base_id)
    asyncio.run(engine.shutdown())


def test_deleting_a_base_with_adapters_is_refused(loaded_platform: Platform, adapters: dict) -> None:
    with pytest.raises(ConflictError, match="adapter"):
        loaded_platform.registry.delete("tiny-chat")
    loaded_platform.registry.get("tiny-chat")  # unchanged
    for name in adapters:
        loaded_platform.registry.delete(name)
    loaded_platform.registry.delete("tiny-chat")


def test_adapter_resolves_its_base_by_name_and_needs_one(
    loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    directory = make_lora(tiny_chat_dir, tmp_path / "named", seed=3)
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    with pytest.raises(ArtifactError, match="not registered"):  # the config names a local path nobody pulled
        loaded_platform.registry.pull(f"file:{directory}", name="orphan")
    config["base_model_name_or_path"] = "tiny-chat"
    config_path.write_text(json.dumps(config))
    record = loaded_platform.registry.pull(f"file:{directory}", name="named")
    assert record.parent_id == loaded_platform.registry.get("tiny-chat").id
    config["base_model_name_or_path"] = "tiny-embed"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ArtifactError, match="chat or completion"):
        loaded_platform.registry.pull(f"file:{directory}", name="on-encoder")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "only LoRA"),
        ({"r": 0}, "positive"),
        ({"rank_pattern": {"(.*)*x": 4}}, "module names"),  # never compiled as a regular expression
        ({"alpha_pattern": {"q_proj": "big"}}, "module names"),
    ],
)
def test_adapters_the_engine_cannot_apply_exactly_are_refused(
    loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path, change: dict, message: str
) -> None:
    directory = make_lora(tiny_chat_dir, tmp_path / "bad", seed=4)
    config = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, **change}))
    base = loaded_platform.registry.get("tiny-chat")
    with pytest.raises(ArtifactError, match=message):
        loaded_platform.registry.pull(f"file:{directory}", name="bad", lineage=Lineage(parent_id=base.id))


def test_ia3_adapter_from_peft_is_refused(loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32)
    get_peft_model(model, IA3Config(task_type="CAUSAL_LM")).save_pretrained(tmp_path / "ia3")
    base = loaded_platform.registry.get("tiny-chat")
    with pytest.raises(ArtifactError, match="only LoRA"):
        loaded_platform.registry.pull(f"file:{tmp_path / 'ia3'}", name="ia3", lineage=Lineage(parent_id=base.id))


def test_adapter_not_matching_its_base_fails_only_its_own_requests(
    loaded_platform: Platform, tiny_chat_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    directory = make_lora(tiny_chat_dir, tmp_path / "wrong", seed=5)
    weights = load_file(directory / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_A" in k)
    weights[key] = torch.zeros(weights[key].shape[0], weights[key].shape[1] + 1)  # in-features off by one
    save_file(weights, directory / "adapter_model.safetensors")
    base = loaded_platform.registry.get("tiny-chat")
    loaded_platform.registry.pull(f"file:{directory}", name="wrong", lineage=Lineage(parent_id=base.id))
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)

    async def main() -> None:
        prompt = await engine.encode_text(await engine.resolve("tiny-chat"), "Hello")
        with pytest.raises(Exception, match="shapes"):
            await _greedy(engine, "wrong", prompt, "bad")
        assert await _greedy(engine, "tiny-chat", prompt, "good")  # the base still serves
        await engine.shutdown()

    asyncio.run(main())


def _toy_adapter(adapter_id: str, rank: int, seed: int, modules: tuple[str, ...] = ("0", "1")) -> Any:
    from llmos.engine.torch_backend.lora import LoraWeights

    g = torch.Generator().manual_seed(seed)
    return LoraWeights(
        adapter_id, {m: (torch.randn(rank, 8, generator=g), torch.randn(8, rank, generator=g)) for m in modules}
    )


def test_bank_reuses_freed_columns_and_keeps_every_row_exact() -> None:
    from llmos.engine.torch_backend.lora_bank import LoraBank

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    reference = {
        name: (layer.weight.detach().clone(), layer.bias.detach().clone()) for name, layer in model.named_children()
    }
    bank = LoraBank(model, budget_bytes=1 << 20)
    made = {"a": _toy_adapter("a", 2, 1), "b": _toy_adapter("b", 4, 2, ("1",)), "c": _toy_adapter("c", 2, 3)}

    def expected(x: torch.Tensor, adapters: list[str | None]) -> torch.Tensor:
        out = []
        for row, adapter in zip(x[:, 0], adapters, strict=True):
            h = row
            for name in ("0", "1"):
                w, bias = reference[name]
                delta = 0
                if adapter is not None and name in made[adapter].modules:
                    a, b = made[adapter].modules[name]
                    delta = h @ a.T @ b.T
                h = h @ w.T + bias + delta
            out.append(h)
        return torch.stack(out)[:, None]

    for name in ("a", "b"):
        bank.acquire(name, lambda shapes, name=name: made[name])
    width = bank.view.width
    x = torch.randn(3, 1, 8)  # (batch, tokens, features), as in a decode step
    rows: list[str | None] = ["a", None, "b"]
    bank.prepare(rows)
    torch.testing.assert_close(model(x), expected(x, rows))
    bank.release("a")
    bank.evict("a")  # its columns are zeroed and free
    bank.acquire("c", lambda shapes: made["c"])  # same rank: fits where "a" was, no reallocation
    assert bank.view.width == width and bank.view.spans["c"][0] == 0
    rows = ["c", "b", None]
    bank.prepare(rows)
    torch.testing.assert_close(model(x), expected(x, rows))
    bank.prepare(["b", "b", "b"])  # one adapter: only its columns are computed
    torch.testing.assert_close(model(x), expected(x, ["b", "b", "b"]))


def test_an_adapter_is_not_fine_tuned_into_an_adapter_of_an_adapter(client: Any, adapters: dict) -> None:
    """A LoRA fine-tune of a LoRA adapter would train in full, then fail to register (an adapter's
    base must be a plain model): it is refused at creation, naming ``model``."""
    import openai

    from tests.unit.test_fine_tuning import LORA, upload

    training = upload(client)
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model="ad-a", training_file=training, method=LORA)
    error = refused.value.body
    assert (error["param"], error["code"]) == ("model", "unsupported_model")
    assert "adapter of an adapter" in error["message"]
    assert client.fine_tuning.jobs.list().data == []
