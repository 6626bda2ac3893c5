"""Only compute threads run torch on several cores: helper threads use one, encoder forward passes
all run on the one shared compute thread, and a chat model's engine thread uses the configured
count (see llmos.engine.threads for why a second OpenMP team slows every decode step)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from llmos.engine import threads
from llmos.engine.protocol import GenerationDelta, GenerationRequest, SamplingParams
from llmos.engine.torch_backend.causal import CausalRunner
from llmos.engine.torch_backend.encoder import EncoderRunner, Pooling


def test_helper_threads_run_torch_on_one_core() -> None:
    with threads.helper_pool(2) as pool:
        assert set(pool.map(lambda _: torch.get_num_threads(), range(4))) == {1}


def test_encoder_forward_passes_run_on_the_one_compute_thread(tiny_encoder_dir: Path) -> None:
    model = AutoModel.from_pretrained(tiny_encoder_dir, dtype=torch.float32).eval()
    runner = EncoderRunner(model, AutoTokenizer.from_pretrained(tiny_encoder_dir), Pooling(), max_length=64)
    seen: list[tuple[str, int]] = []
    forward = runner._forward

    def recording(batch: list[list[int]]) -> torch.Tensor:
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return forward(batch)

    runner._forward = recording  # type: ignore[method-assign]
    with threads.helper_pool(4) as pool:
        results = list(pool.map(lambda i: runner.embed([f"text number {i}"]), range(8)))
    assert all(len(r.vectors) == 1 for r in results)
    assert seen and {name for name, _ in seen} == {seen[0][0]}
    assert seen[0][0].startswith("engine-compute")
    assert {n for _, n in seen} == {threads.compute_threads()}


def test_the_engine_thread_uses_the_compute_thread_count(tiny_chat_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    runner = CausalRunner(model, AutoTokenizer.from_pretrained(tiny_chat_dir), context_length=128)
    counts: list[int] = []
    original = runner._step

    def recording(state: Any) -> Any:
        counts.append(torch.get_num_threads())
        return original(state)

    runner._step = recording  # type: ignore[method-assign]
    done = threading.Event()

    def sink(delta: GenerationDelta) -> None:
        if delta.finish_reason is not None:
            done.set()

    with ThreadPoolExecutor(1, initializer=threads.enter_helper_thread) as pool:  # submitted from a helper
        pool.submit(runner.submit, GenerationRequest("r", "m", [5, 6, 7], SamplingParams(max_tokens=3)), sink)
        assert done.wait(60)
    runner.close()
    assert counts and set(counts) == {threads.compute_threads()}
