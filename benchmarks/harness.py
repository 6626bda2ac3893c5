"""What the serving benchmarks share: the model, prompts, a server on loopback, and measurements."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "datasets" / "sft_self_instruct" / "test.jsonl"
MODEL = "smollm2-135m-instruct"
KEY = "bench-admin-key-0123456789"


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
