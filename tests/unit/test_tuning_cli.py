"""`llmos finetune create` with `--method dpo` and `llmos jobs events --follow` on a DPO job, against
the app in-process (the CLI's openai client on a TestClient, no supervisor: jobs stay queued
unless the test moves them as a worker would)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from typer.testing import CliRunner

from llmos.cli import tuning
from llmos.cli.main import app
from llmos.platform import Platform
from tests.unit.test_dpo import PAIRS

runner = CliRunner()
CHAT = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]


@pytest.fixture
def cli(quiet_client: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> openai.OpenAI:
    monkeypatch.setattr(tuning, "api_client", lambda settings, key: quiet_client)
    return quiet_client


def _lines(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return str(path)


def _flat(output: str) -> str:
    return " ".join(output.replace("│", " ").split())  # rich wraps long lines, errors in a box


def test_a_dpo_job_is_created_with_its_beta(cli: openai.OpenAI, tmp_path: Path) -> None:
    pairs = _lines(tmp_path / "pairs.jsonl", PAIRS)
    args = ["finetune", "create", "--model", "tiny-chat", "--training-file", pairs, "--validation-file", pairs]
    made = runner.invoke(app, [*args, "--method", "dpo", "--beta", "0.25", "--epochs", "2", "--adapter", "full"])
    assert made.exit_code == 0, made.output
    (job,) = cli.fine_tuning.jobs.list().data
    assert job.id in made.output and job.method is not None and job.method.type == "dpo"
    assert job.method.dpo is not None and job.method.dpo.hyperparameters is not None
    assert (job.method.dpo.hyperparameters.beta, job.method.dpo.hyperparameters.n_epochs) == (0.25, 2)
    assert job.model_dump()["method"]["dpo"]["adapter"] == "full"
    # Without --beta, the server's default (DPO's usual 0.1) is resolved at creation.
    again = runner.invoke(app, [*args, "--method", "dpo"])
    assert again.exit_code == 0, again.output
    newest = cli.fine_tuning.jobs.list().data[0]
    assert newest.method is not None and newest.method.dpo is not None and newest.method.dpo.hyperparameters
    assert newest.method.dpo.hyperparameters.beta == 0.1


@pytest.mark.parametrize(
    ("options", "named", "says"),
    [
        (["--beta", "0.2"], "--beta", "applies to --method dpo only"),  # supervised by default
        (["--method", "dpo", "--beta", "0"], "--beta", "between 0.001 and 10"),
        (["--method", "dpo", "--beta", "11"], "--beta", "between 0.001 and 10"),
        (["--method", "dpo", "--epochs", "0"], "--epochs", "between 1 and 50"),
        (["--method", "reinforcement"], "--method", "supervised, dpo"),
        (["--method", "dpo", "--adapter", "qlora"], "--adapter", "adapter type must be one of"),
    ],
)
def test_bad_options_are_refused_before_any_upload(
    cli: openai.OpenAI, tmp_path: Path, options: list[str], named: str, says: str
) -> None:
    pairs = _lines(tmp_path / "pairs.jsonl", PAIRS)
    refused = runner.invoke(app, ["finetune", "create", "--model", "tiny-chat", "--training-file", pairs, *options])
    assert refused.exit_code == 2, refused.output
    assert named in refused.output and says in _flat(refused.output)
    assert cli.files.list().data == [] and cli.fine_tuning.jobs.list().data == []


def test_the_servers_refusal_is_shown_with_the_field_it_names(cli: openai.OpenAI, tmp_path: Path) -> None:
    chat = _lines(tmp_path / "chat.jsonl", CHAT)
    refused = runner.invoke(
        app, ["finetune", "create", "--model", "tiny-chat", "--training-file", chat, "--method", "dpo"]
    )
    assert refused.exit_code == 1, refused.output
    shown = _flat(refused.output)
    assert "trains on preference lines" in shown and "(param training_file, code invalid_training_file)" in shown
    assert "Error code: 400" not in shown  # the message, not the client's repr of the response
    assert cli.fine_tuning.jobs.list().data == []


def test_following_a_dpo_job_shows_its_preference_metrics(
    cli: openai.OpenAI, loaded_platform: Platform, tmp_path: Path
) -> None:
    pairs = _lines(tmp_path / "pairs.jsonl", PAIRS)
    made = runner.invoke(
        app, ["finetune", "create", "--model", "tiny-chat", "--training-file", pairs, "--method", "dpo"]
    )
    assert made.exit_code == 0, made.output
    (job,) = cli.fine_tuning.jobs.list().data
    # What a DPO worker reports, through the job store as the worker writes it (the training
    # itself is covered by tests/unit/test_dpo.py).
    store = loaded_platform.jobs
    attempt = store.claim(job.id)
    assert attempt is not None
    for step, loss, right in ((1, 0.693, 0.5), (2, 0.601, 0.75)):
        train = {"step": step, "train_loss": loss, "train_preference_accuracy": right, "total_steps": 2, "epoch": 1}
        store.record_metrics(job.id, train)
    validation = {
        "step": 2,
        "epoch": 1,
        "valid_loss": 0.612,
        "valid_preference_accuracy": 0.833,
        "valid_reward_margin": 0.214,
        "valid_chosen_reward": 0.101,
        "valid_rejected_reward": -0.113,
    }
    store.record_metrics(job.id, validation)
    store.succeed(job.id, attempt, fine_tuned_model="ft:tiny-chat:default::x", trained_tokens=10)

    followed = runner.invoke(app, ["jobs", "events", job.id, "--follow"])
    assert followed.exit_code == 0, followed.output
    shown = _flat(followed.output)
    assert "validation, epoch 1: loss 0.612, preference accuracy 0.833, reward margin 0.214" in shown
    assert "chosen reward 0.101, rejected reward -0.113" in shown
    assert "train_loss=0.601, train_preference_accuracy=0.750" in shown
    assert "succeeded: ft:tiny-chat:default::x" in shown
