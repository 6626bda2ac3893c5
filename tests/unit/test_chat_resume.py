"""A chat fine-tune stopped after a checkpoint and resumed ends with the very weights of one that was
never stopped: data order and dropout masks depend on the seed and the epoch only."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmos.training.run import Hooks, Stopped, TrainingResult, TrainingRun
from llmos.training.sft import run_sft
from llmos.training.spec import TrainingSpec

ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Say the word number {i}"},
            {"role": "assistant", "content": "Paris is the capital of France."},
        ]
    }
    for i in range(8)
]


def _run(tiny_chat_dir: Path, tmp: Path, control: Callable[[], str | None] = lambda: None) -> TrainingResult:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "train.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    spec = TrainingSpec(n_epochs=3, batch_size=2, adapter="lora", lora_r=4, lora_dropout=0.3)
    hooks = Hooks(metrics=lambda m: None, message=lambda m: None, checkpoint=lambda *a: None, control=control)
    return run_sft(
        TrainingRun(
            tiny_chat_dir, tmp / "train.jsonl", None, spec, seed=9, work_dir=tmp / "work", hooks=hooks, bf16=False
        )
    )


@pytest.mark.slow
def test_a_resumed_chat_run_ends_with_the_weights_of_an_unstopped_one(tiny_chat_dir: Path, tmp_path: Path) -> None:
    straight = _run(tiny_chat_dir, tmp_path / "a")
    calls = iter(range(1000))
    with pytest.raises(Stopped):  # paused in epoch 3, after the epoch-2 checkpoint
        _run(tiny_chat_dir, tmp_path / "b", control=lambda: "pause" if next(calls) == 9 else None)
    assert (tmp_path / "b" / "work" / "ckpt-epoch-2").is_dir()
    resumed = _run(tiny_chat_dir, tmp_path / "b")
    a = load_file(straight.model_dir / "adapter_model.safetensors")
    b = load_file(resumed.model_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name
