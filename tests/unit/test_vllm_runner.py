"""The vLLM runner's failures (docs/adr/0037): a step that fails (vLLM's engine core died) crashes
the engine loop so the model is reloaded, while a request vLLM refuses fails alone; an adapter of a
LoRA rank over ``vllm_max_lora_rank`` is refused before vLLM sees it. vLLM is faked: nothing here
imports it."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from llmos.engine import FinishReason, GenerationDelta, GenerationRequest, SamplingParams
from llmos.engine.config import EngineConfig
from llmos.engine.vllm_backend.runner import VllmApi, VllmRunner
from llmos.errors import InvalidRequestError


class EngineDeadError(Exception):
    """Like vLLM's: its engine core process is gone."""


class FakeCore:
    def __init__(self) -> None:
        self.shut_down = False

    def shutdown(self) -> None:
        self.shut_down = True


class FakeEngine:
    """An ``LLMEngine`` whose core dies at the first step; ``refuse`` names requests it refuses."""

    def __init__(self, refuse: frozenset[str] = frozenset()) -> None:
        self.refuse = refuse
        self.added: list[tuple[str, Any]] = []
        self.engine_core = FakeCore()

    def add_request(self, request_id: str, prompt: Any, params: Any, *, lora_request: Any = None) -> None:
        if request_id in self.refuse:
            raise ValueError(f"{request_id} asks for too much")
        self.added.append((request_id, lora_request))

    def has_unfinished_requests(self) -> bool:
        return True

    def step(self) -> list[Any]:
        raise EngineDeadError("EngineCore encountered an issue")

    def abort_request(self, request_ids: list[str]) -> None:
        pass


def _runner(engine: FakeEngine, adapters: Path | None = None) -> VllmRunner:
    api = VllmApi(sampling_params=lambda **kw: kw, lora_request=lambda **kw: kw, delta="delta")
    return VllmRunner(
        engine,
        api,
        tokenizer=None,
        name="chat",
        config=EngineConfig(vllm_max_lora_rank=16),
        context_length=512,
        adapter_dir=lambda adapter_id: (adapters or Path("/nonexistent")) / adapter_id,
    )


def _request(request_id: str) -> GenerationRequest:
    return GenerationRequest(request_id, "chat", [1, 2, 3], SamplingParams(max_tokens=4))


def test_a_dead_vllm_engine_crashes_the_loop_so_the_model_is_reloaded() -> None:
    engine = FakeEngine()
    runner = _runner(engine)
    crashed = threading.Event()
    seen: list[BaseException] = []
    runner.on_crash = lambda exc: (seen.append(exc), crashed.set())
    deltas: list[GenerationDelta] = []
    runner.submit(_request("a"), deltas.append)
    assert crashed.wait(30), "the loop went on after vLLM's engine core died"
    assert isinstance(seen[0], EngineDeadError) and runner.crashed is seen[0]
    assert engine.engine_core.shut_down  # its GPU memory is given back before the reload
    runner.close()


def test_a_request_vllm_refuses_fails_alone_and_the_loop_goes_on() -> None:
    engine = FakeEngine(refuse=frozenset({"bad"}))
    runner = _runner(engine)
    failed = threading.Event()
    deltas: list[GenerationDelta] = []

    def sink(delta: GenerationDelta) -> None:
        deltas.append(delta)
        failed.set()

    runner.submit(_request("bad"), sink)
    assert failed.wait(30)
    assert deltas[0].finish_reason is FinishReason.ERROR and "too much" in (deltas[0].error or "")
    assert runner.crashed is None
    runner.close()


def _lora(directory: Path, r: int, rank_pattern: dict[str, int] | None = None) -> None:
    directory.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": ["q_proj"]}
    if rank_pattern:
        config["rank_pattern"] = rank_pattern
    (directory / "adapter_config.json").write_text(json.dumps(config))
    (directory / "adapter_model.safetensors").write_bytes(b"")


@pytest.mark.parametrize(("r", "rank_pattern"), [(32, None), (8, {"v_proj": 64})])
def test_an_adapter_over_vllm_max_lora_rank_is_refused_before_vllm_sees_it(
    tmp_path: Path, r: int, rank_pattern: dict[str, int] | None
) -> None:
    _lora(tmp_path / "big", r, rank_pattern)
    with pytest.raises(InvalidRequestError, match="over the 16") as refused:
        _runner(FakeEngine(), tmp_path).check_adapter("big")
    assert refused.value.param == "model"


def test_an_adapter_within_vllm_max_lora_rank_is_accepted(tmp_path: Path) -> None:
    _lora(tmp_path / "small", 16, {"v_proj": 8})
    _runner(FakeEngine(), tmp_path).check_adapter("small")
