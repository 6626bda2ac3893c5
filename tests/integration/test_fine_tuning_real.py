"""Fine-tuning SmolLM2 with LoRA through the CLI and the openai client on the real server,
including `kill -9` of the server mid-job and a restart that resumes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import openai
import pytest

from tests.integration.conftest import ADMIN_KEY, Server, start_server, stop_server

pytestmark = pytest.mark.integration
SST2 = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "sst2" / "train.tsv"
PROMPT = "Is the sentiment of this movie review positive or negative? Answer with one word.\n\n"


def sst2_chat(path: Path, n: int) -> Path:
    rows = [line.split("\t") for line in SST2.read_text().splitlines()[1 : n + 1]]
    with path.open("w") as out:
        for sentence, label in rows:
            answer = "positive" if label.strip() == "1" else "negative"
            out.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": PROMPT + sentence},
                            {"role": "assistant", "content": answer},
                        ]
                    }
                )
                + "\n"
            )
    return path


def test_cli_finetune_follow_then_chat(server: Server, tmp_path: Path) -> None:
    data = sst2_chat(tmp_path / "sst2-chat.jsonl", 24)
    env = {**os.environ, "LLMOS_API_KEY": ADMIN_KEY, "LLMOS_PORT": str(urlparse(server.url).port), "COLUMNS": "200"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llmos",
            "finetune",
            "create",
            "--model",
            "smollm2-135m-instruct",
            "--training-file",
            str(data),
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--suffix",
            "sst2",
            "--seed",
            "1",
            "--follow",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    name = next(w for w in result.stdout.split() if w.startswith("ft:smollm2-135m-instruct:default:sst2:"))
    client = server.client(timeout=120)
    reply = client.chat.completions.create(
        model=name,
        temperature=0,
        max_tokens=3,
        messages=[{"role": "user", "content": PROMPT + "a gorgeous , witty , seductive movie ."}],
    )
    assert (reply.choices[0].message.content or "").strip().lower().startswith(("positive", "negative"))
    assert client.models.retrieve(name).parent == "smollm2-135m-instruct"  # type: ignore[attr-defined]


def _home_with_smollm(shared: Path, home: Path) -> Path:
    """A data directory of its own (so no other server's supervisor can take the job), with
    SmolLM2 registered from the shared home's already converted files."""
    from llmos.config import Settings
    from llmos.platform import Platform

    source = Platform.open(Settings(home=shared))
    model_dir = source.registry.model_dir(source.registry.get("smollm2-135m-instruct"))
    source.close()
    target = Platform.open(Settings(home=home))
    target.registry.pull(f"file:{model_dir}", name="smollm2-135m-instruct")
    target.close()
    return home


def test_kill_9_of_the_server_mid_job_then_restart_resumes_it(server: Server, tmp_path: Path) -> None:
    home = _home_with_smollm(server.home, tmp_path / "home")
    own = start_server(home)  # a server of its own to kill
    try:
        client = own.client(timeout=120)
        data = sst2_chat(tmp_path / "sst2-chat.jsonl", 16)
        with data.open("rb") as f:
            training = client.files.create(file=f, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(
            model="smollm2-135m-instruct",
            training_file=training.id,
            seed=3,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 8}, "max_seq_length": 128},
            },
        )  # type: ignore[arg-type]
        deadline = time.monotonic() + 600
        while not client.fine_tuning.jobs.checkpoints.list(job.id).data:
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(1)
        own.process.send_signal(signal.SIGKILL)
        own.process.wait(timeout=30)
        deadline = time.monotonic() + 15
        while not _worker_gone(job.id):
            assert time.monotonic() < deadline, "the worker outlived its server"
            time.sleep(0.5)
        own = start_server(home)
        client = own.client(timeout=120)
        deadline = time.monotonic() + 900
        while (status := client.fine_tuning.jobs.retrieve(job.id).status) not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, status
            time.sleep(2)
        assert status == "succeeded"
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=500).data]
        assert any("stopped answering" in m for m in messages)  # settled once its heartbeat was 30 s old
        assert any(m.startswith("Resumed from checkpoint") for m in messages)
        assert len(client.fine_tuning.jobs.checkpoints.list(job.id).data) == 3  # no epoch trained twice
    except openai.APIError as exc:
        pytest.fail(f"API error: {exc}")
    finally:
        stop_server(own)


def _worker_gone(job_id: str) -> bool:
    """The worker died with its server (PR_SET_PDEATHSIG), so the job cannot run twice."""
    out = subprocess.run(
        ["pgrep", "-f", f"llmos.training.worker {job_id}"], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() == ""
