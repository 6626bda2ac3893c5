"""Which backend serves a model, by capability (docs/adr/0037): vLLM where the GPU, vllm and the
model's architecture allow, torch elsewhere; a forced vLLM refused clearly. The machine is a faked
inventory (``GpuOffer``); nothing here serves a request."""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable

import pytest
import torch

from llmos.config import Settings
from llmos.engine.backends import Backends
from llmos.engine.config import EngineConfig
from llmos.engine.local import LocalEngine
from llmos.engine.vllm_backend import backend as vllm_backend
from llmos.engine.vllm_backend.capability import GpuOffer, choose
from llmos.errors import ModelLoadError, NotInstalledError
from llmos.kernel.devices import GpuInfo
from llmos.platform import Platform

GIB = 1 << 30
H100 = GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, 0.0, (9, 0))
BUSY_H100 = dataclasses.replace(H100, memory_free_bytes=20 * GIB)
LLAMA = frozenset({"LlamaForCausalLM", "Qwen2ForCausalLM"})
CAPABLE = GpuOffer("0.34.0", (H100,), LLAMA)


@pytest.mark.parametrize(
    ("offer", "task", "weights", "vllm", "reason"),
    [
        (CAPABLE, "chat", GIB, True, "vLLM 0.34.0 on GPU 0 (NVIDIA H100"),
        (CAPABLE, "completion", GIB, True, "on GPU 0"),
        (CAPABLE, "embedding", GIB, False, "not embedding models"),
        (GpuOffer(None, (), frozenset()), "chat", GIB, False, 'pip install "llmos[vllm]"'),
        (GpuOffer("0.34.0", (), frozenset()), "chat", GIB, False, "no NVIDIA GPU"),
        (GpuOffer("0.34.0", (BUSY_H100,), LLAMA), "chat", GIB, False, "20480 MiB free, less than the 69632 MiB"),
        (GpuOffer("0.34.0", (H100,), frozenset({"GPT2LMHeadModel"})), "chat", GIB, False, "does not implement"),
        (CAPABLE, "chat", 70 * GIB, False, "do not fit the 69632 MiB"),
    ],
)
def test_vllm_serves_a_model_only_where_gpu_extra_and_architecture_allow(
    offer: GpuOffer, task: str, weights: int, vllm: bool, reason: str
) -> None:
    made = choose("auto", task, offer, ["LlamaForCausalLM"], weights, 0.85)
    assert made.vllm is vllm
    assert reason in made.reason


def test_gpu_backend_torch_never_chooses_vllm() -> None:
    made = choose("torch", "chat", CAPABLE, ["LlamaForCausalLM"], GIB, 0.85)
    assert not made.vllm and "gpu_backend is torch" in made.reason


def test_a_model_without_an_architecture_is_not_sent_to_vllm() -> None:
    assert not choose("auto", "chat", CAPABLE, [], GIB, 0.85).vllm


def _fake_machine(monkeypatch: pytest.MonkeyPatch, offer: GpuOffer | Callable[[], GpuOffer]) -> list[int]:
    """Every engine built from now on reads ``offer`` as this machine's; returns the probe count."""
    probes: list[int] = []

    def probe() -> GpuOffer:
        probes.append(1)
        return offer() if callable(offer) else offer

    monkeypatch.setattr(vllm_backend, "probe_offer", probe)
    return probes


def _backends(platform: Platform, **config: object) -> Backends:
    return Backends(platform.registry, EngineConfig(**config), torch.float32)  # type: ignore[arg-type]


def test_auto_sends_chat_models_to_vllm_on_a_capable_gpu_and_the_rest_to_torch(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_machine(monkeypatch, CAPABLE)
    backends = _backends(loaded_platform)
    assert backends.for_model(loaded_platform.registry.get("tiny-chat")).name == "vllm"
    assert backends.for_model(loaded_platform.registry.get("tiny-embed")).name == "torch"


@pytest.mark.parametrize(
    "offer",
    [
        GpuOffer(None, (), frozenset()),
        GpuOffer("0.34.0", (), frozenset()),
        GpuOffer("0.34.0", (BUSY_H100,), LLAMA),
        GpuOffer("0.34.0", (H100,), frozenset({"GPT2LMHeadModel"})),
    ],
    ids=["no-extra", "no-gpu", "gpu-busy", "architecture-unknown"],
)
def test_auto_falls_back_to_torch_where_vllm_cannot_serve(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch, offer: GpuOffer
) -> None:
    _fake_machine(monkeypatch, offer)
    assert _backends(loaded_platform).for_model(loaded_platform.registry.get("tiny-chat")).name == "torch"


def test_gpu_backend_torch_does_not_even_look_at_the_gpus(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    probes = _fake_machine(monkeypatch, CAPABLE)
    backends = _backends(loaded_platform, gpu_backend="torch")
    assert backends.for_model(loaded_platform.registry.get("tiny-chat")).name == "torch"
    assert probes == []


def test_a_model_keeps_the_backend_chosen_at_its_first_request(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's own engine takes the GPU memory it is given: the next look at the GPU must not send
    the model it serves to torch."""
    offers = iter([CAPABLE, GpuOffer("0.34.0", (BUSY_H100,), LLAMA)])
    _fake_machine(monkeypatch, lambda: next(offers))
    backends = _backends(loaded_platform)
    record = loaded_platform.registry.get("tiny-chat")
    assert backends.for_model(record).name == "vllm"
    assert backends.for_model(record).name == "vllm"


def test_llama_cpp_keeps_the_gguf_models_the_settings_give_it(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_machine(monkeypatch, CAPABLE)
    record = dataclasses.replace(loaded_platform.registry.get("tiny-chat"), extra={"gguf_file": "tiny.gguf"})
    assert not _backends(loaded_platform, gguf_backend="llama.cpp").named("vllm").serves(record)
    assert _backends(loaded_platform).named("vllm").serves(record)


def test_vllm_applies_lora_adapters_and_leaves_prefix_tuning_to_torch(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_machine(monkeypatch, CAPABLE)
    vllm = _backends(loaded_platform).named("vllm")
    record = loaded_platform.registry.get("tiny-chat")
    assert vllm.applies(dataclasses.replace(record, format="lora"))
    assert not vllm.applies(dataclasses.replace(record, format="prefix"))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_forcing_vllm_without_the_extra_stops_the_engine_from_starting(settings: Settings) -> None:
    """The real probe of this machine (no vllm installed): a clear start-up error, not a fallback."""
    platform = Platform.open(settings.model_copy(update={"gpu_backend": "vllm"}))
    try:
        with pytest.raises(
            NotInstalledError, match=r"gpu_backend is 'vllm', but vllm is not installed .*llmos\[vllm\]"
        ):
            LocalEngine(platform.registry, platform.settings)
    finally:
        platform.close()


def test_forcing_vllm_without_a_gpu_stops_the_engine_from_starting(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_machine(monkeypatch, GpuOffer("0.34.0", (), frozenset()))
    with pytest.raises(NotInstalledError, match="no NVIDIA GPU"):
        _backends(loaded_platform, gpu_backend="vllm")


def test_forcing_vllm_on_a_model_it_cannot_serve_fails_that_model_s_load_with_the_reason(
    loaded_platform: Platform, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_machine(monkeypatch, GpuOffer("0.34.0", (H100,), frozenset({"GPT2LMHeadModel"})))
    backends = _backends(loaded_platform, gpu_backend="vllm")
    record = loaded_platform.registry.get("tiny-chat")
    backend = backends.for_model(record)
    assert backend.name == "vllm"
    with pytest.raises(
        ModelLoadError, match=r"vLLM cannot serve tiny-chat: vLLM 0\.34\.0 does not implement LlamaForCausalLM"
    ):
        backend.load(record)
