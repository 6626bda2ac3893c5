"""The PEFT methods a job can ask for, below the API: AdaLoRA really re-allocates its rank
budget and is regularised, and an encoder trains with it through the shared loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from llmos.training.adapters import merged, regularization, wrap_model
from llmos.training.checkpoints import LocalCheckpoints, resume_latest, save_epoch
from llmos.training.classify import run_classification
from llmos.training.optim import Optimization
from llmos.training.run import Hooks, TrainingRun
from llmos.training.spec import TrainingSpec
from llmos.training.state import TrainingState


@pytest.mark.slow
def test_adalora_prunes_its_rank_budget_while_training(tiny_chat_dir: Path) -> None:
    torch.manual_seed(0)
    spec = TrainingSpec(adapter="adalora", lora_r=4, batch_size=2, n_epochs=1)
    model = wrap_model(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), spec, "CAUSAL_LM", total_steps=40)
    start = sum(p.numel() for n, p in model.named_parameters() if "lora_E" in n)  # r per adapted layer
    opt = Optimization(model, spec, 40, weight_decay=0.0)
    ids = torch.randint(0, 100, (2, 12))
    for number in range(1, 41):
        loss = model(input_ids=ids, labels=ids).loss
        penalty = regularization(model)
        assert penalty is not None and penalty.requires_grad
        (loss + penalty).backward()
        opt.step(number)
    kept = model.peft_config["default"].rank_pattern  # the allocation PEFT saves with the adapter
    assert kept and sum(sum(mask) for mask in kept.values()) <= start // 2  # pruned to target_r = r / 2
    pruned = sum(int((p == 0).sum()) for n, p in model.named_parameters() if "lora_E" in n)
    assert pruned >= start // 2  # and the pruned singular values are zero in the weights


def test_only_adalora_adds_a_penalty(tiny_chat_dir: Path) -> None:
    spec = TrainingSpec(adapter="lora", lora_r=4)
    model = wrap_model(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), spec, "CAUSAL_LM", total_steps=10)
    assert regularization(model) is None


def test_an_encoder_classifier_trains_with_adalora(tiny_encoder_dir: Path, tmp_path: Path) -> None:
    rows = [{"text": "hello how are you", "label": "greeting"}, {"text": "paris is in france", "label": "fact"}] * 8
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    seen: list[dict] = []
    hooks = Hooks(metrics=seen.append, message=lambda m: None, checkpoint=lambda *a: None, control=lambda: None)
    spec = TrainingSpec(adapter="adalora", lora_r=4, n_epochs=3, batch_size=4, learning_rate_multiplier=20)
    run = TrainingRun(tiny_encoder_dir, data, data, spec, seed=1, work_dir=tmp_path / "work", hooks=hooks, bf16=False)
    result = run_classification(run)
    assert (result.model_dir / "model.safetensors").is_file()  # merged into plain weights
    assert not (result.model_dir / "adapter_config.json").exists()
    assert {"valid_accuracy", "valid_macro_f1", "valid_report"} <= set(result.metrics)
    assert any("train_loss" in m for m in seen)
    trained = AutoModelForSequenceClassification.from_pretrained(result.model_dir)
    assert trained.config.id2label == {0: "fact", 1: "greeting"}
    base = AutoModel.from_pretrained(tiny_encoder_dir)
    name, weight = next((n, p) for n, p in base.named_parameters() if n.endswith("query.weight"))
    assert not torch.equal(dict(trained.base_model.named_parameters())[name], weight)  # the update was merged in


ADALORA = TrainingSpec(adapter="adalora", lora_r=4, lora_dropout=0.0)


def _adalora(tiny_chat_dir: Path, total: int) -> tuple[Any, Optimization]:
    torch.manual_seed(0)
    model = wrap_model(AutoModelForCausalLM.from_pretrained(tiny_chat_dir), ADALORA, "CAUSAL_LM", total_steps=total)
    return model, Optimization(model, ADALORA, total, weight_decay=0.0)


def _train_until(model: Any, opt: Optimization, state: TrainingState, until: int, ids: torch.Tensor) -> None:
    while state.step < until:
        penalty = regularization(model)
        assert penalty is not None
        (model(input_ids=ids, labels=ids).loss + penalty).backward()
        state.step += 1
        opt.step(state.step)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [20, 34])  # while ranks are re-allocated; after the final allocation (step 32)
def test_a_resumed_adalora_run_keeps_its_rank_allocation(tiny_chat_dir: Path, tmp_path: Path, stop: int) -> None:
    """Resumed from a checkpoint, AdaLoRA goes on with the importance scores and rank pattern it
    had, so it ends with the very ranks and weights of a run never stopped."""
    total, ids = 40, torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    model, opt = _adalora(tiny_chat_dir, total)
    state = TrainingState()
    _train_until(model, opt, state, stop, ids)
    save_epoch(tmp_path, 1, model=model, optimizer=opt.optimizer, scheduler=opt.scheduler, state=state.to_json())
    _train_until(model, opt, state, total, ids)

    resumed, resumed_opt = _adalora(tiny_chat_dir, total)
    saved = resume_latest(
        LocalCheckpoints(tmp_path), resumed, resumed_opt.optimizer, resumed_opt.scheduler, lambda m: None
    )
    resumed_state = TrainingState.from_json(saved)
    assert resumed_state.step == stop
    _train_until(resumed, resumed_opt, resumed_state, total, ids)

    pattern = model.peft_config["default"].rank_pattern
    assert pattern and resumed.peft_config["default"].rank_pattern == pattern  # what save_pretrained writes
    trained = dict(resumed.named_parameters())
    for name, value in model.named_parameters():
        assert torch.equal(trained[name], value), name  # the pruned singular values (zeros) included
    model.eval()
    resumed.eval()
    with torch.no_grad():
        logits = resumed(input_ids=ids).logits
        assert torch.equal(model(input_ids=ids).logits, logits)
        # The result is served merged: the pruned ranks stay zeros in the merged weights.
        torch.testing.assert_close(merged(resumed, ADALORA)(input_ids=ids).logits, logits)
