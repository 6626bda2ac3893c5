"""Tenants sharing one decode batch: the row caps, and the engine applying them (parking rows)."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from llmos.engine import GenerationRequest, SamplingParams
from llmos.engine.local import LocalEngine
from llmos.engine.torch_backend import CausalRunner
from llmos.kernel.fair_share import row_caps
from llmos.platform import Platform


def test_a_tenant_alone_uses_the_whole_batch() -> None:
    assert row_caps({"flood": 30}, 32, 4) == {"flood": 32}


def test_a_light_tenant_holds_every_tenant_to_the_light_share() -> None:
    assert row_caps({"flood": 30, "quiet": 1}, 32, 4) == {"flood": 4, "quiet": 4}


def test_busy_tenants_alone_share_the_batch_equally() -> None:
    assert row_caps({"a": 30, "b": 20}, 32, 4) == {"a": 16, "b": 16}
    assert row_caps({"a": 30, "b": 20, "idle": 0}, 32, 4) == {"a": 16, "b": 16}


def test_zero_turns_the_caps_off() -> None:
    assert row_caps({"flood": 30, "quiet": 1}, 32, 0) == {"flood": 32, "quiet": 32}


async def _tokens(engine: LocalEngine, rid: str, prompt: list[int], tenant: str, max_tokens: int) -> list[int]:
    out: list[int] = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    async for delta in engine.generate(GenerationRequest(rid, "tiny-chat", prompt, params, tenant=tenant)):
        assert delta.error is None
        out.extend(delta.token_ids)
    return out


@pytest.mark.slow
def test_a_flood_is_held_to_its_share_while_a_light_tenant_decodes(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps: list[Counter[str]] = []
    original = CausalRunner._step

    def recording_step(runner: CausalRunner, state: Any) -> Any:
        steps.append(Counter(r.pending.request.tenant for r in state.rows if not r.finished))
        return original(runner, state)

    monkeypatch.setattr(CausalRunner, "_step", recording_step)
    engine = LocalEngine(loaded_platform.registry, loaded_platform.settings)

    async def main() -> None:
        prompts = [
            await engine.encode_text(await engine.resolve("tiny-chat"), f"Request number {i} says") for i in range(10)
        ]
        solo = [await _tokens(engine, f"solo{i}", p, "flood", 30) for i, p in enumerate(prompts)]
        steps.clear()
        flood = [asyncio.create_task(_tokens(engine, f"f{i}", p, "flood", 30)) for i, p in enumerate(prompts)]
        while not steps or steps[-1]["flood"] < 10:  # the flood fills the batch while it is alone
            await asyncio.sleep(0.005)
        quiet = await _tokens(engine, "q", prompts[0], "quiet", 12)
        assert await asyncio.gather(*flood) == solo  # parked rows resume exactly where they stopped
        assert quiet == solo[0][: len(quiet)]
        shared = [s for s in steps if s["quiet"]]
        assert shared and all(s["flood"] <= loaded_platform.settings.tenant_rows_when_shared for s in shared)
        runner = engine.residency.peek(engine.registry.get("tiny-chat").id)
        assert isinstance(runner, CausalRunner) and runner.share.parks >= 6
        await engine.shutdown()

    asyncio.run(main())
