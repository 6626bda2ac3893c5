"""DPO as a fine-tuning method: training on a few preference pairs ranks them right, through the
shared loop (LoRA against its own base, full fine-tuning); a DPO job through the API; requests
that cannot train are refused before anything is queued."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from llmos.kernel.supervisor import JobSupervisor
from llmos.training.dpo import DPOTask, load_pairs
from llmos.training.loop import fit
from llmos.training.run import Hooks, TrainingRun
from llmos.training.sft import load_causal_model
from llmos.training.spec import parse_spec
from tests.unit.test_fine_tuning import drive

PAIRS = [
    {
        "input": {"messages": [{"role": "user", "content": f"Tell me a fact number {i}"}]},
        "preferred_output": [{"role": "assistant", "content": "The capital of France is Paris."}],
        "non_preferred_output": [{"role": "assistant", "content": "A quick brown fox jumps over the lazy dog."}],
    }
    for i in range(6)
]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def _task(tiny_chat_dir: Path, tmp_path: Path, adapter: str, log: list[Any]) -> DPOTask:
    from transformers import AutoTokenizer

    method = {
        "type": "dpo",
        "dpo": {
            "hyperparameters": {"n_epochs": 4, "batch_size": 3, "beta": 0.5, "learning_rate_multiplier": 20},
            "adapter": {"type": adapter},
        },
    }
    spec = parse_spec(method, None, training_records=len(PAIRS))
    data = _write(tmp_path / "pairs.jsonl", PAIRS)
    hooks = Hooks(metrics=log.append, message=lambda m: None, checkpoint=lambda *a: None, control=lambda: None)
    run = TrainingRun(tiny_chat_dir, data, data, spec, seed=3, work_dir=tmp_path / "work", hooks=hooks, bf16=False)
    torch.manual_seed(3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    pairs = load_pairs(data, tokenizer, spec.max_seq_length)
    return DPOTask(run, load_causal_model(run, len(pairs)), tokenizer, pairs, pairs)


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_dpo_ranks_its_pairs_right(tiny_chat_dir: Path, tmp_path: Path, adapter: str) -> None:
    log: list[Any] = []
    task = _task(tiny_chat_dir, tmp_path, adapter, log)
    before = task.evaluate()
    # Before any step the policy is its reference: every reward is 0, no pair is ranked right.
    assert before is not None and before["valid_reward_margin"] == pytest.approx(0, abs=1e-4)
    assert before["valid_preference_accuracy"] == 0.0
    result = fit(task, task.run)
    validation = [m for m in log if "valid_preference_accuracy" in m]
    assert len(validation) == 4  # one validation event per epoch
    assert result.metrics["valid_preference_accuracy"] == 1.0
    assert result.metrics["valid_reward_margin"] > 0.5
    assert result.metrics["valid_loss"] < before["valid_loss"]
    assert any("train_preference_accuracy" in m for m in log)


def test_the_reference_is_the_base_without_the_adapter(tiny_chat_dir: Path, tmp_path: Path) -> None:
    # Prompt tuning changes the model's outputs from its first step (its virtual tokens are drawn
    # at random), so only a reference with the adapter off starts every reward at 0.
    task = _task(tiny_chat_dir, tmp_path, "prompt_tuning", [])
    before = task.evaluate()
    assert before is not None and before["valid_chosen_reward"] != pytest.approx(0, abs=1e-3)


def test_a_completion_is_labelled_without_its_prompt(tiny_chat_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    (pair,) = load_pairs(_write(tmp_path / "one.jsonl", PAIRS[:1]), tokenizer, 512)
    labelled = tokenizer.decode([t for t in pair.chosen.labels if t >= 0])
    assert labelled.startswith("The capital of France is Paris.<|im_end|>")
    assert "fact" not in labelled and "assistant" not in labelled
    # Too long: the prompt loses its start, the completion stays whole.
    (cut,) = load_pairs(_write(tmp_path / "one.jsonl", PAIRS[:1]), tokenizer, 20)
    assert len(cut.chosen.input_ids) == 20
    assert tokenizer.decode([t for t in cut.chosen.labels if t >= 0]) == labelled


def _upload(client: openai.OpenAI, rows: list[dict[str, Any]]) -> str:
    data = "\n".join(json.dumps(r) for r in rows).encode()
    return client.files.create(file=("train.jsonl", data), purpose="fine-tune").id


def _dpo(**hyperparameters: Any) -> dict[str, Any]:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def test_bad_dpo_requests_are_refused_before_queueing(quiet_client: openai.OpenAI) -> None:
    client = quiet_client
    pairs = _upload(client, PAIRS)
    chat = _upload(client, [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    cases = [
        ({"training_file": pairs, "method": _dpo(beta=0)}, "method.dpo.hyperparameters.beta"),
        ({"training_file": pairs, "method": _dpo(beta=-0.1)}, "method.dpo.hyperparameters.beta"),
        ({"training_file": pairs, "method": _dpo(beta="strong")}, "method.dpo.hyperparameters.beta"),
        ({"training_file": pairs, "method": _dpo(n_epochs=0)}, "method.dpo.hyperparameters.n_epochs"),
        ({"training_file": pairs, "method": {"type": "dpo", "dpo": {"adapter": {"r": 0}}}}, "method.dpo.adapter.r"),
        ({"training_file": pairs, "method": {"type": "dpo", "supervised": {}}}, "method.supervised"),
        ({"training_file": pairs, "method": {"type": "reinforcement"}}, "method.type"),
        ({"training_file": chat, "method": _dpo(beta=0.1)}, "training_file"),  # not preference lines
        ({"training_file": pairs, "method": {"type": "supervised"}}, "method.type"),
        ({"training_file": pairs}, "method.type"),
        ({"training_file": pairs, "validation_file": chat, "method": _dpo()}, "validation_file"),
        (
            {"training_file": pairs, "method": {"type": "supervised", "supervised": {"hyperparameters": {"beta": 1}}}},
            "method.supervised.hyperparameters.beta",
        ),
        ({"training_file": pairs, "method": {"type": "dpo", "dpo": {"packing": True}}}, "method.dpo.packing"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            client.post("/fine_tuning/jobs", body={"model": "tiny-chat", **body}, cast_to=object)
        assert exc.value.body["param"] == param, (body, exc.value.body)  # type: ignore[index]
    assert client.fine_tuning.jobs.list().data == []


@pytest.mark.slow
def test_a_dpo_job_runs_in_a_worker_and_reports_preferences(
    quiet_client: openai.OpenAI, supervisor: JobSupervisor
) -> None:
    client = quiet_client
    pairs = _upload(client, PAIRS)
    method = {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}, "adapter": {"r": 4}}}
    job = client.fine_tuning.jobs.create(model="tiny-chat", training_file=pairs, validation_file=pairs, method=method)  # type: ignore[arg-type]
    assert job.method is not None and job.method.type == "dpo" and job.method.supervised is None
    assert job.method.dpo is not None and job.method.dpo.hyperparameters is not None
    assert (job.method.dpo.hyperparameters.beta, job.method.dpo.hyperparameters.n_epochs) == (0.2, 2)
    supervisor.tick()
    drive(supervisor, client, job.id, lambda: not supervisor.running)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done.error
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    validation = [e.data for e in events if e.type == "metrics" and e.data and "valid_reward_margin" in e.data]
    assert len(validation) == 2 and all("valid_preference_accuracy" in d for d in validation)  # type: ignore[operator]
    assert client.models.retrieve(done.fine_tuned_model or "").parent == "tiny-chat"  # type: ignore[attr-defined]
