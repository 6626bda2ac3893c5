"""What the serving benchmarks share: the model, prompts, a server on loopback, the engine's runner
in this process, and measurements."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# The packages whose versions a result depends on (those not installed are left out).
PACKAGES = (
    "llmos",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "tokenizers",
    "fastapi",
    "uvicorn",
    "llama-cpp-python",
    "sentence-transformers",
    "numpy",
)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
DATASET = ROOT.parent / "shared" / "datasets" / "sft_self_instruct" / "test.jsonl"
MODEL = "smollm2-135m-instruct"
KEY = "bench-admin-key-0123456789"
PROMPT_TOKENS = 128
"""The prompt length of the benchmarks that drive the engine's runner in this process."""


def prompts(n: int) -> list[list[dict[str, str]]]:
    rows = [json.loads(line) for line in DATASET.read_text().splitlines() if line.strip()]
    out = []
    for row in rows[:n]:
        text = row["instruction"] + ("\n\n" + row["input"] if row.get("input") else "")
        out.append([{"role": "user", "content": text}])
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class PeakRss:
    """Samples the resident memory of a process (and its children) while a run lasts."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _rss(self) -> int:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(
    command: list[str], url: str, *, env: dict[str, str] | None = None, health: str = "/health"
) -> subprocess.Popen[bytes]:
    """Start a server process and wait until ``url + health`` answers 200 (models load first)."""
    proc = subprocess.Popen(
        command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    for _ in range(1800):
        if proc.poll() is not None:
            raise SystemExit(f"{command[0]} exited with {proc.returncode} before answering")
        try:
            if httpx.get(f"{url}{health}", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"{' '.join(command)} did not start")


def start_server(home: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """``llmos serve`` on a free loopback port with the benchmark's admin key."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = {"LLMOS_HOME": str(home), "LLMOS_ADMIN_KEY": KEY, "LLMOS_PORT": str(port), "HF_HUB_OFFLINE": "1"}
    return launch([sys.executable, "-m", "llmos", "serve"], url, env={**settings, **(env or {})}), url


@dataclass(frozen=True)
class InProcessRunner:
    """The torch engine's runner of a registered model, in this process (no server, no HTTP)."""

    runner: Any
    """A ``CausalRunner``, closed by its user."""
    tokenizer: Any
    dtype: str
    """The weights' dtype, e.g. ``float32`` (``auto`` resolved on this CPU)."""
    config: Any
    """The runner's ``EngineConfig``: a server's of these settings, the prefix cache off."""

    def prompt(self) -> list[int]:
        """The benchmarks' prompt: ``PROMPT_TOKENS`` tokens of one repeated sentence."""
        ids: list[int] = self.tokenizer("The history of the printing press begins with " * 40)["input_ids"]
        return ids[:PROMPT_TOKENS]


def load_runner(home: Path, model: str = MODEL, *, dtype: str | None = None) -> InProcessRunner:
    """``model`` of ``home``'s registry in the engine's runner, built as the server builds it (its
    settings, thread configuration and dtype; ``dtype`` overrides the setting) but with the prefix
    cache off, so each request computes and keeps its own cache. The calling thread runs torch on
    one core from here on, as the server's threads other than its engine loops do: a second
    thread with a team of OpenMP workers (this one, loading the weights) stops libgomp's idle
    workers from spinning, and every operator of the runner's steps then waits for sleeping
    workers to wake (``llmos.engine.threads``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmos.config import Settings
    from llmos.engine import threads
    from llmos.engine.config import EngineConfig
    from llmos.engine.local import resolve_dtype
    from llmos.engine.process import configure_process
    from llmos.engine.torch_backend.causal import CausalRunner

    overrides: dict[str, Any] = {"dtype": dtype} if dtype else {}
    settings = Settings(home=home, prefix_cache_mb=0, **overrides)
    configure_process(settings)
    threads.enter_helper_thread()
    _, model_dir = registered_model(settings, model)
    torch_dtype = resolve_dtype(settings.dtype)
    weights = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = EngineConfig.from_settings(settings)
    return InProcessRunner(
        runner=CausalRunner(weights, tokenizer, context_length=2048, config=config),
        tokenizer=tokenizer,
        dtype=str(torch_dtype).removeprefix("torch."),
        config=config,
    )


def registered_model(settings: Any, model: str = MODEL) -> tuple[Any, Path]:
    """``model``'s registry record in the home of ``settings`` (``llmos.config.Settings``), and a
    local directory holding its files."""
    from llmos.platform import Platform

    platform = Platform.open(settings)
    try:
        record = platform.registry.get(model)
        return record, platform.registry.model_dir(record)
    finally:
        platform.close()


RESULT_PREFIX = "RESULT "


def print_child_result(result: dict[str, Any]) -> None:
    """What a benchmark run by ``run_child`` hands back: one line of JSON on its stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: str, args: list[str]) -> dict[str, Any]:
    """``script`` run again in a child process with ``args`` (one measurement in a process of its
    own, so its peak memory is its own): the result it printed with ``print_child_result``."""
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith(RESULT_PREFIX))
    result: dict[str, Any] = json.loads(line.removeprefix(RESULT_PREFIX))
    return result


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


def _cpu() -> dict[str, Any]:
    model, flags = platform.processor(), set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": usable, "flags": [f for f in CPU_FLAGS if f in flags]}


def run_facts() -> dict[str, Any]:
    """What a result depends on besides its own settings: the commit, package versions, CPU and date."""
    versions = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return {
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "src", "benchmarks")),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "packages": versions,
        "cpu": _cpu(),
    }


def write_result(name: str, result: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``result`` with the run's facts (key ``run``) as JSON, and return where.

    By default the file is ``benchmarks/results/<name>-<UTC date and time>-<commit>.json``. An
    existing file is never replaced, since the docs cite result files: if ``out`` exists, the
    result goes beside it under a name with the date, time and a number added.
    """
    facts = run_facts()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    if out is None:
        out = RESULTS / f"{name}-{stamp}-{facts['commit'][:8] or 'nocommit'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = out if attempt == 1 else out.with_name(f"{out.stem}-{stamp}-{attempt}{out.suffix}")
        try:
            with path.open("x", encoding="utf-8") as f:
                json.dump({**result, "run": facts}, f, indent=2)
        except FileExistsError:
            continue
        if path != out:
            print(f"{out} exists and is kept (results are never overwritten)")
        print(f"wrote {path}")
        return path
    raise SystemExit(f"could not find a free name beside {out}")
