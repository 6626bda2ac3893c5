"""Gradient accumulation: an epoch whose batches do not divide into groups still applies its last,
shorter group in that epoch, scaled by that group's own size (the chat and encoder loops share it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos.training.optim import Accumulation, Optimization
from llmos.training.run import Hooks, TrainingRun
from llmos.training.sft import run_sft
from llmos.training.spec import TrainingSpec


def test_the_last_shorter_group_steps_and_is_scaled_by_its_size() -> None:
    five = Accumulation(batches=5, every=2)
    assert [five.steps_after(b) for b in range(5)] == [False, True, False, True, True]
    assert [five.scale(b) for b in range(5)] == [2, 2, 2, 2, 1]
    assert sum(five.steps_after(b) for b in range(5)) == TrainingSpec(
        batch_size=1, gradient_accumulation_steps=2, n_epochs=1
    ).total_steps(5)
    one = Accumulation(batches=3, every=1)
    assert [one.steps_after(b) for b in range(3)] == [True] * 3 and [one.scale(b) for b in range(3)] == [1] * 3
    wide = Accumulation(batches=2, every=4)  # fewer batches than one group
    assert [wide.steps_after(b) for b in range(2)] == [False, True] and [wide.scale(b) for b in range(2)] == [2, 2]


def _chat_run(tiny_chat_dir: Path, tmp_path: Path, spec: TrainingSpec, rows: list[dict[str, Any]]) -> list[int]:
    """Train on ``rows``; the step counter at each epoch's checkpoint."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    steps: list[int] = []
    hooks = Hooks(
        metrics=lambda m: None,
        message=lambda m: None,
        checkpoint=lambda step, *rest: steps.append(step),
        control=lambda: None,
    )
    run_sft(TrainingRun(tiny_chat_dir, data, None, spec, seed=3, work_dir=tmp_path / "work", hooks=hooks, bf16=False))
    return steps


def _rows(n: int, *, same: bool = False) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": "Say the word" if same else f"Say the word number {i}"},
                {"role": "assistant", "content": "Paris is the capital of France."},
            ]
        }
        for i in range(n)
    ]


def test_chat_epochs_apply_their_leftover_batches(tiny_chat_dir: Path, tmp_path: Path) -> None:
    spec = TrainingSpec(n_epochs=2, batch_size=2, gradient_accumulation_steps=2, adapter="lora", lora_r=4)
    steps = _chat_run(tiny_chat_dir, tmp_path, spec, _rows(10))  # 5 batches an epoch: groups of 2, 2 and 1
    assert steps == [3, 6]
    assert steps[-1] == spec.total_steps(10)  # what the learning-rate schedule was built for


def test_a_shorter_group_follows_the_mean_loss_of_its_batches(
    tiny_chat_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two batches of two identical conversations, accumulated in a group meant for four, give the
    gradient of one batch of all four: their mean loss, not half of it."""
    grads: list[dict[str, torch.Tensor]] = []
    step = Optimization.step

    def recording(self: Optimization, number: int) -> None:
        grads.append({n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None})
        step(self, number)

    monkeypatch.setattr(Optimization, "step", recording)
    spec = TrainingSpec(n_epochs=1, adapter="lora", lora_r=4, lora_dropout=0.0)
    _chat_run(
        tiny_chat_dir,
        tmp_path / "a",
        TrainingSpec(**{**spec.as_dict(), "batch_size": 2, "gradient_accumulation_steps": 4}),
        _rows(4, same=True),
    )
    _chat_run(tiny_chat_dir, tmp_path / "b", TrainingSpec(**{**spec.as_dict(), "batch_size": 4}), _rows(4, same=True))
    accumulated, whole = grads
    assert accumulated.keys() == whole.keys() and any(g.abs().sum() > 0 for g in whole.values())
    for name, value in whole.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-4, atol=1e-7, msg=name)
