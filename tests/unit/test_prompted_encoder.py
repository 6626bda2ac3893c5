"""Prefix and prompt tuning of encoders: the virtual tokens compute what PEFT's prompt tuning and
transformers' own key/value path compute, train (classification and NER, resumable), are saved
beside the encoder's weights and are served by the task endpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertForTokenClassification,
    DynamicCache,
)

from llmos.engine.config import EngineConfig
from llmos.engine.torch_backend.loader import load_runner
from llmos.engine.torch_backend.prompted_encoder import WEIGHTS_FILE, PromptedEncoder, load_prompted
from llmos.errors import ModelLoadError
from llmos.training.classify import run_classification
from llmos.training.run import Hooks, Stopped, TrainingRun
from llmos.training.spec import TrainingSpec
from tests.conftest import ADMIN_KEY
from tests.unit.test_fine_tuning import wait_for

CONFIG = BertConfig(
    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
)
ROWS = [
    {"text": "hello how are you today", "label": "greeting"},
    {"text": "the capital of france is paris", "label": "fact"},
] * 12


def _batch() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # a padded row
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("head", [BertForSequenceClassification, BertForTokenClassification])
def test_prompt_tuning_computes_what_peft_computes(head: type) -> None:
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    model = head(CONFIG).eval()
    ours = PromptedEncoder(model, "prompt_tuning", 4)
    ours.initialize(torch.Generator().manual_seed(1))
    token_level = head is BertForTokenClassification
    task = TaskType.TOKEN_CLS if token_level else TaskType.SEQ_CLS
    peft = get_peft_model(model, PromptTuningConfig(task_type=task, num_virtual_tokens=4)).eval()
    batch = _batch()
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(ours.prompt)
        expected = peft(**batch).logits
        got = ours(**batch).logits
    if token_level:  # PEFT keeps the virtual positions; a tag per input token drops them
        expected = expected[:, 4:]
    assert got.shape == (2, 7, 3) if token_level else (2, 3)
    assert torch.equal(got, expected)


def test_prefix_tuning_computes_what_the_models_own_key_value_path_computes() -> None:
    torch.manual_seed(0)
    model = BertForSequenceClassification(CONFIG).eval()
    reference = BertForSequenceClassification(CONFIG).eval()
    reference.load_state_dict(model.state_dict())
    ours = PromptedEncoder(model, "prefix_tuning", 3)
    batch = _batch()
    with torch.no_grad():
        for prefix in ours.virtual_parameters():
            prefix.normal_()
        got = ours(**batch).logits
        cache = DynamicCache(config=CONFIG)  # the same keys and values before every layer's own
        for layer, prefix in enumerate(ours.virtual_parameters()):
            cache.update(prefix[0].expand(2, -1, -1, -1).clone(), prefix[1].expand(2, -1, -1, -1).clone(), layer)
        mask = torch.cat([torch.ones(2, 3, dtype=torch.long), batch["attention_mask"]], dim=1)
        expected = reference(
            input_ids=batch["input_ids"], attention_mask=mask, cache=cache, position_ids=torch.arange(7)[None]
        ).logits
        plain = reference(**batch).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, plain)  # the prefix changes the result


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_only_the_virtual_tokens_and_the_head_train(method: str) -> None:
    model = BertForSequenceClassification(CONFIG)
    ours = PromptedEncoder(model, method, 5)
    ours.initialize()
    ours.freeze_base(train_head=True)
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    assert {"model.classifier.weight", "model.classifier.bias"} <= trainable
    assert all(n.startswith("model.classifier") or n == "prompt" or n.endswith("virtual_prefix") for n in trainable)
    assert len(trainable) == 2 + (1 if method == "prompt_tuning" else CONFIG.num_hidden_layers)
    assert all(p.abs().sum() > 0 for p in ours.virtual_parameters())  # started from real activations, not zeros


def _run(base: Path, tmp: Path, spec: TrainingSpec, control=lambda: None, valid: bool = True) -> tuple[object, list]:  # type: ignore[no-untyped-def]
    (tmp / "train.jsonl").parent.mkdir(parents=True, exist_ok=True)
    (tmp / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    log: list = []
    hooks = Hooks(metrics=log.append, message=lambda m: None, checkpoint=lambda *a: None, control=control)
    result = run_classification(
        TrainingRun(
            base_dir=base,
            train_path=tmp / "train.jsonl",
            valid_path=tmp / "train.jsonl" if valid else None,
            spec=spec,
            seed=5,
            work_dir=tmp / "work",
            hooks=hooks,
            bf16=False,
        )
    )
    return result, log


def _classifier(model_dir: Path) -> Any:
    """The engine's runner for a classification model directory (512 positions)."""
    return load_runner(
        model_dir,
        "sequence-classification",
        dtype=torch.float32,
        context_length=512,
        config=EngineConfig(),
        name="t",
    )


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_a_classifier_trains_and_is_saved_beside_its_unchanged_base(
    tiny_encoder_dir: Path, tmp_path: Path, method: str
) -> None:
    spec = TrainingSpec(n_epochs=2, batch_size=4, adapter=method, num_virtual_tokens=6)
    result, log = _run(tiny_encoder_dir, tmp_path, spec, valid=False)  # no validation: the last epoch is kept
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in log if "train_loss" in m)
    out = result.model_dir  # type: ignore[attr-defined]
    first = load_file(tmp_path / "work" / "ckpt-epoch-1" / "trainable.safetensors")
    last = load_file(out / WEIGHTS_FILE)["virtual_tokens"]
    at_epoch_1 = (
        first["prompt"]
        if method == "prompt_tuning"
        else torch.stack([first[k] for k in sorted(first) if "virtual" in k])
    )
    assert not torch.allclose(at_epoch_1, last)  # the virtual tokens were trained (learning itself: the MiniLM test)
    settings = json.loads((out / "virtual_tokens.json").read_text())
    assert settings == {"method": method, "num_virtual_tokens": 6}
    saved = load_file(out / "model.safetensors")
    base = load_file(tiny_encoder_dir / "model.safetensors")
    shared = [k for k in saved if k.removeprefix("bert.") in base]
    assert shared and all(torch.equal(saved[k], base[k.removeprefix("bert.")]) for k in shared)  # base frozen
    assert not any("virtual" in k for k in saved)  # the encoder's file loads as a plain encoder
    runner = _classifier(out)
    assert isinstance(runner.model, PromptedEncoder)
    assert runner.max_length == 512 - (6 if method == "prompt_tuning" else 0)
    served = runner.classify([r["text"] for r in ROWS[:2]])
    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        without = torch.softmax(
            plain(**runner.tokenizer([r["text"] for r in ROWS[:2]], return_tensors="pt", padding=True)).logits, -1
        )
    assert not torch.allclose(torch.tensor(served.scores), without)  # the virtual tokens are really applied


@pytest.mark.slow
def test_a_stopped_prefix_run_resumes_to_the_same_virtual_tokens(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    spec = TrainingSpec(n_epochs=2, batch_size=4, adapter="prefix_tuning", num_virtual_tokens=3)
    straight, _ = _run(tiny_encoder_dir, tmp_path / "a", spec)
    steps = iter(range(1000))
    with pytest.raises(Stopped):  # paused during epoch 2, after the epoch-1 checkpoint
        _run(tiny_encoder_dir, tmp_path / "b", spec, control=lambda: "pause" if next(steps) == 8 else None)
    resumed, _ = _run(tiny_encoder_dir, tmp_path / "b", spec)
    a = load_file(straight.model_dir / WEIGHTS_FILE)["virtual_tokens"]  # type: ignore[attr-defined]
    b = load_file(resumed.model_dir / WEIGHTS_FILE)["virtual_tokens"]  # type: ignore[attr-defined]
    assert torch.equal(a, b)


def test_virtual_tokens_of_the_wrong_shape_are_refused_at_load(tmp_path: Path) -> None:
    model = BertForSequenceClassification(CONFIG)
    ours = PromptedEncoder(model, "prefix_tuning", 3)
    ours.save_pretrained(tmp_path)
    save_file({"virtual_tokens": torch.zeros(2, 2, 4, 3, 9)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match="shape"):
        load_prompted(BertForSequenceClassification.from_pretrained(tmp_path), tmp_path)
    (tmp_path / "virtual_tokens.json").write_text(json.dumps({"method": "../x", "num_virtual_tokens": 3}))
    with pytest.raises(ModelLoadError):
        _classifier(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "task"), [("prefix_tuning", "classifications"), ("prompt_tuning", "ner")])
def test_a_virtual_token_job_on_an_encoder_is_served_by_its_task_endpoint(
    client: openai.OpenAI, http: TestClient, method: str, task: str
) -> None:
    if task == "ner":
        rows = [{"tokens": ["paris", "is", "in", "france"], "tags": ["B-LOC", "O", "O", "B-LOC"]}] * 8
    else:
        rows = ROWS
    data = "\n".join(json.dumps(r) for r in rows).encode()
    training = client.files.create(file=("train.jsonl", data), purpose="fine-tune").id
    adapter = {"type": method, "num_virtual_tokens": 4}
    job = client.fine_tuning.jobs.create(
        model="tiny-embed",
        training_file=training,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 4}, "adapter": adapter},
        },
    )  # type: ignore[arg-type]
    done = wait_for(client, job.id, {"succeeded", "failed"})
    assert done.status == "succeeded", done.error  # type: ignore[attr-defined]
    name = done.fine_tuned_model  # type: ignore[attr-defined]
    first = client.fine_tuning.jobs.checkpoints.list(job.id).data[-1].fine_tuned_model_checkpoint
    for model in (name, first):  # the result and an epoch's checkpoint
        resp = http.post(
            f"/v1/{task}",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            json={"model": model, "input": ["paris is in france"]},
        )
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["data"]) == 1
