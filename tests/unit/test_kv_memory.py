"""The key/value budget bounds the memory a decode batch really takes, measured as the process's
resident memory while the largest batch the settings allow runs to the end of its reservations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from llmos.config import Settings
from llmos.engine import heap
from llmos.engine.config import EngineConfig
from llmos.engine.process import ONEDNN_CACHE_PRIMITIVES, ONEDNN_CACHES, cap_onednn_caches, configure_process
from llmos.engine.protocol import GenerationDelta, GenerationRequest, SamplingParams
from llmos.engine.torch_backend import CausalRunner
from llmos.registry.adapters import kv_width

ROWS = 16
PROMPT = [5, 6, 7, 8, 9, 10]
MAX_TOKENS = 250
BURST_BUDGET_MB = 48
BURST_LAYERS = 16
BURST_REQUESTS = 96
PRIMITIVES_MB = 96
"""What oneDNN's two primitive caches hold at ``ONEDNN_CACHE_PRIMITIVES`` (32) entries each for
this model's shapes, with what varies between runs: the crowd grew by 154 MB for 48 + 32 (a cap of
16 gave 113, of 64 202; under load, 2026-12-06)."""


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _growth_during(work: Callable[[], object]) -> int:
    """The process's resident memory at its peak while ``work`` runs, above what it held before
    (after a trim), sampled every 2 ms."""
    heap.trim()
    baseline = _rss()
    peak = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss())
            stop.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        work()
    finally:
        stop.set()
        sampler.join()
    return peak - baseline


def measure(tiny_chat_dir: Path) -> dict[str, int]:
    """Run in a fresh process: another test's leftovers in the heap would be measured too."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    # Wide key/value states (8 heads of 64 per layer), so the cache dwarfs everything else.
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=512,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    per_token = kv_width(config.to_dict()) * 4  # float32
    reserve = len(PROMPT) + MAX_TOKENS
    probe = CausalRunner(model, tokenizer, context_length=512)  # only for its per-row overhead and copy share
    overhead, copies = probe.kv_budget.row_overhead_tokens, 1 + probe.kv_budget.copy_share
    budget = int(ROWS * (reserve + overhead) * copies * per_token) + per_token  # exactly ROWS rows of this reservation
    runner = CausalRunner(
        model,
        tokenizer,
        context_length=512,
        config=EngineConfig(max_batch_size=64, kv_cache_bytes=budget, prefix_cache_bytes=0, batch_wait_s=0.2),
    )
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    assert runner.kv_budget.fits([reserve] * ROWS) and not runner.kv_budget.fits([reserve] * (ROWS + 1))

    def run(ids: list[str], params: SamplingParams) -> None:
        done = threading.Semaphore(0)

        def sink(delta: GenerationDelta) -> None:
            if delta.finish_reason is not None:
                done.release()

        for rid in ids:
            runner.submit(GenerationRequest(rid, "m", PROMPT, params), sink)
        for _ in ids:
            assert done.acquire(timeout=120)

    try:
        run(["warm"], greedy)  # kernels, thread pools and the first buffers: not the batch's
        grown = _growth_during(lambda: run([f"r{i}" for i in range(ROWS)], greedy))
    finally:
        runner.close()
    return {"budget": budget, "grown": grown, "peak_rows": runner.peak_rows}


def measure_burst(tiny_chat_dir: Path) -> dict[str, int]:
    """A crowd of requests of every length, so that rows join and leave the batch step after step
    (each time every layer's keys and values are copied at a new size) and each step's attention
    has a new shape: the process's resident memory from before the crowd to its peak, in a fresh
    process set up as ``llmos serve`` sets up its own, with the default settings but the budget."""
    settings = Settings(kv_cache_mb=BURST_BUDGET_MB, prefix_cache_mb=0, batch_wait_ms=50)
    configure_process(settings)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=256,
        num_hidden_layers=BURST_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()  # served models' dtype: products on oneDNN
    runner = CausalRunner(model, tokenizer, context_length=512, config=EngineConfig.from_settings(settings))

    def run(count: int) -> None:
        done = threading.Semaphore(0)

        def sink(delta: GenerationDelta) -> None:
            if delta.finish_reason is not None:
                done.release()

        for i in range(count):
            prompt = [5 + (i * 7 + j) % 300 for j in range(4 + i * 13 % 60)]
            params = SamplingParams(max_tokens=16 + i * 37 % 200, temperature=0.0, ignore_eos=True)
            runner.submit(GenerationRequest(f"r{i}", "m", prompt, params), sink)
        for _ in range(count):
            assert done.acquire(timeout=300)

    try:
        run(1)  # kernels, thread pools and the first buffers: not the crowd's
        grown = _growth_during(lambda: run(BURST_REQUESTS))
    finally:
        runner.close()
    return {
        "budget": runner.kv_budget.budget_bytes,
        "slack": settings.heap_slack_mb << 20,
        "grown": grown,
        "peak_rows": runner.peak_rows,
    }


@pytest.mark.slow
def test_the_largest_batch_stays_within_the_key_value_budget(tiny_chat_dir: Path) -> None:
    code = (
        "import json, pathlib; from tests.unit.test_kv_memory import measure; "
        f"print(json.dumps(measure(pathlib.Path({str(tiny_chat_dir)!r}))))"
    )
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    budget, grown = result["budget"], result["grown"]
    print(f"budget {budget / 2**20:.1f} MiB, resident growth at peak {grown / 2**20:.1f} MiB")
    assert result["peak_rows"] == ROWS  # the largest batch the budget allows ran
    # The allocator's own slack (5% + 4 MiB), plus 8 MiB for what varies between runs and machines: this
    # machine measures 76-79 MiB for the 80 MiB budget at every commit since the budget was introduced
    # (idle or loaded, 1-8 threads), but loaded runs and one CI run measured 87.5 and 90.9 (issue 23).
    assert grown <= budget * 1.05 + (12 << 20)
    assert grown >= budget * 0.5  # the batch's cache was really measured


def test_serving_caps_onednn_primitive_caches_unless_the_operator_did(monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = ONEDNN_CACHES
    monkeypatch.delenv(first, raising=False)
    monkeypatch.setenv(second, "512")
    cap_onednn_caches()
    assert os.environ[first] == str(ONEDNN_CACHE_PRIMITIVES) and os.environ[second] == "512"


@pytest.mark.slow
def test_a_crowd_stays_within_the_budget_and_the_stated_overhead(tiny_chat_dir: Path) -> None:
    """Rows joining and leaving a full batch for hundreds of steps: the process grows by at most
    ``kv_cache_mb`` + ``heap_slack_mb`` + oneDNN's capped primitive caches (docs/performance.md,
    Decode-batch memory). Without the slack and the caps it grew by 850 MB for a 48 MB budget."""
    code = (
        "import json, pathlib; from tests.unit.test_kv_memory import measure_burst; "
        f"print(json.dumps(measure_burst(pathlib.Path({str(tiny_chat_dir)!r}))))"
    )
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ONEDNN_CACHES and not k.startswith("LLMOS_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    budget, slack, grown = result["budget"], result["slack"], result["grown"]
    print(f"budget {budget / 2**20:.0f} MiB + slack {slack / 2**20:.0f} MiB, resident growth {grown / 2**20:.1f} MiB")
    assert result["peak_rows"] >= 16  # a crowd, not a few rows
    assert grown <= budget * 1.05 + slack + (PRIMITIVES_MB << 20)
