"""The one training loop, driven by a toy task that is neither chat nor an encoder: a run stopped
after a checkpoint and resumed ends with the weights of one never stopped, early stopping and
the best epoch kept follow validation, and the typed state goes through a checkpoint as JSON."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmos.errors import ArtifactError
from llmos.training.checkpoints import LocalCheckpoints
from llmos.training.loop import Selection, StepOutput, TrainingTask, fit
from llmos.training.run import Hooks, Stopped, TrainingResult, TrainingRun
from llmos.training.spec import TrainingSpec
from llmos.training.state import EpochScore, TrainingState

Pair = tuple[torch.Tensor, int]


class ToyTask(TrainingTask[Pair]):
    """Classify random 8-dimensional points by the sign of their first coordinate, with dropout
    (so a resumed run matches only if the loop restores its random state per epoch)."""

    selection = Selection(metric="valid_loss", higher_is_better=False, keep_best=True)
    description = "toy classification"

    def __init__(self, scores: Iterator[float] | None = None) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
        points = torch.randn(20, 8, generator=torch.Generator().manual_seed(1))
        self.train = [(x, int(x[0] > 0)) for x in points]
        self.scores = scores  # validation losses to report, one per epoch; None: no validation data

    def step(self, batch: list[Pair]) -> StepOutput:
        logits = self.model(torch.stack([x for x, _ in batch]))
        target = torch.tensor([y for _, y in batch])
        loss = torch.nn.functional.cross_entropy(logits, target)
        return StepOutput(loss, int((logits.argmax(-1) == target).sum()), len(batch), tokens=8 * len(batch))

    def evaluate(self) -> dict[str, Any] | None:
        return None if self.scores is None else {"valid_loss": next(self.scores), "valid_report": {"note": "toy"}}

    def save_checkpoint_model(self, directory: Path) -> None:
        self.save_result(directory)

    def save_result(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, directory / "model.safetensors")


SPEC = TrainingSpec(
    n_epochs=4, batch_size=3, adapter="full", learning_rate_multiplier=500, gradient_accumulation_steps=2
)


def _fit(
    task: ToyTask, work: Path, spec: TrainingSpec = SPEC, control: Callable[[], str | None] = lambda: None
) -> tuple[TrainingResult, list[Any]]:
    log: list[Any] = []
    hooks = Hooks(
        metrics=log.append, message=log.append, checkpoint=lambda *a: log.append(("checkpoint", *a)), control=control
    )
    run = TrainingRun(work, work / "train", None, spec, seed=5, work_dir=work, hooks=hooks, bf16=False)
    return fit(task, run), log


def test_a_resumed_run_ends_with_the_weights_of_an_unstopped_one(tmp_path: Path) -> None:
    straight, _ = _fit(ToyTask(), tmp_path / "a")
    calls = iter(range(1000))
    with pytest.raises(Stopped) as stopped:  # 7 batches an epoch: paused in epoch 3, after the epoch-2 checkpoint
        _fit(ToyTask(), tmp_path / "b", control=lambda: "pause" if next(calls) == 16 else None)
    assert stopped.value.reason == "pause"
    assert sorted(p.name for p in (tmp_path / "b").glob("ckpt-*")) == ["ckpt-epoch-1", "ckpt-epoch-2"]
    resumed, log = _fit(ToyTask(), tmp_path / "b")
    assert "Resumed from checkpoint at step 8 (epoch 2)" in log
    assert [entry[1:3] for entry in log if isinstance(entry, tuple)] == [(12, 3), (16, 4)]  # (step, epoch)
    a, b = load_file(straight.model_dir / "model.safetensors"), load_file(resumed.model_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name
    assert resumed.trained_tokens == straight.trained_tokens == 4 * 20 * 8
    assert not torch.equal(a["0.weight"], ToyTask().model.state_dict()["0.weight"])  # it did train


def test_early_stopping_keeps_the_best_epoch(tmp_path: Path) -> None:
    spec = TrainingSpec(**{**SPEC.as_dict(), "n_epochs": 10, "early_stopping_patience": 2})
    result, log = _fit(ToyTask(iter([0.9, 0.5, 0.5, 0.7, 0.1])), tmp_path, spec)
    checkpoints = [entry for entry in log if isinstance(entry, tuple)]
    assert [c[2] for c in checkpoints] == [1, 2, 3, 4]  # not improving in epochs 3 and 4: stopped
    assert "Early stopping after epoch 4: valid_loss stopped improving" in log
    assert "Keeping epoch 2, the best on validation (valid_loss=0.5000)" in log
    assert result.metrics["best_epoch"] == 2 and result.metrics["valid_loss"] == 0.5
    assert result.metrics["valid_report"] == {"note": "toy"}  # every metric of the best epoch, not only scalars
    best = load_file(tmp_path / "ckpt-epoch-2" / "model" / "model.safetensors")
    kept = load_file(result.model_dir / "model.safetensors")
    last = load_file(tmp_path / "ckpt-epoch-4" / "model" / "model.safetensors")
    assert all(torch.equal(kept[k], best[k]) for k in best) and not torch.equal(kept["0.weight"], last["0.weight"])
    validation = [m for m in log if isinstance(m, dict) and "valid_loss" in m]
    assert [(m["step"], m["epoch"]) for m in validation] == [(4, 1), (8, 2), (12, 3), (16, 4)]
    assert all("valid_report" not in m for m in validation)  # events carry scalars; checkpoints everything
    assert checkpoints[1][3]["valid_report"] == {"note": "toy"} and checkpoints[1][3]["step"] == 8


class _StoreDamage:
    """The run's checkpoints as the artifact store lays them out, the epochs of ``damaged`` found
    corrupt there (as ``JobCheckpoints.restore`` reports a blob that no longer hashes to its name)."""

    def __init__(self, work: Path, damaged: set[int]) -> None:
        self.local, self.damaged = LocalCheckpoints(work), damaged

    def latest_epoch(self, before: int | None = None) -> int | None:
        return self.local.latest_epoch(before)

    def fetch(self, epoch: int) -> Path:
        if epoch in self.damaged:
            raise ArtifactError(f"checkpoint of epoch {epoch} is corrupt in the artifact store", code="hash_mismatch")
        return self.local.fetch(epoch)


@pytest.mark.parametrize("where", ["store", "file"])
@pytest.mark.parametrize(("damaged", "kept"), [({2}, 3), ({2, 3}, 4)])
def test_keep_best_passes_over_a_damaged_best_checkpoint(
    tmp_path: Path, where: str, damaged: set[int], kept: int
) -> None:
    """Epoch 2 is the best and epoch 3 the next: with epoch 2's checkpoint damaged (in the store, or
    its file in the work directory) the job still completes, keeping epoch 3; with epoch 3's damaged
    too, the last epoch's weights, in memory already."""

    def damage(step: int, epoch: int, metrics: dict[str, Any], directory: Path) -> None:
        if epoch == 4 and where == "file":  # after the last checkpoint: keep-best comes next
            for bad in damaged:
                (tmp_path / f"ckpt-epoch-{bad}" / "trainable.safetensors").write_bytes(b"not a safetensors file")

    log: list[Any] = []
    hooks = Hooks(metrics=log.append, message=log.append, checkpoint=damage, control=lambda: None)
    source = _StoreDamage(tmp_path, damaged if where == "store" else set())
    run = TrainingRun(
        tmp_path, tmp_path / "train", None, SPEC, seed=5, work_dir=tmp_path, hooks=hooks, bf16=False, checkpoints=source
    )
    result = fit(ToyTask(iter([0.9, 0.5, 0.6, 0.7])), run)
    assert result.metrics["best_epoch"] == kept and result.metrics["epoch"] == kept
    assert sorted(result.metrics["unrestorable_epochs"]) == sorted(str(e) for e in damaged)
    (message,) = [m for m in log if isinstance(m, str) and m.startswith("Keeping epoch")]
    assert (
        message.startswith(f"Keeping epoch {kept} (valid_loss=0.") and "passed over as unrestorable: epoch 2" in message
    )
    weights = load_file(tmp_path / f"ckpt-epoch-{kept}" / "model" / "model.safetensors")
    final = load_file(result.model_dir / "model.safetensors")
    assert all(torch.equal(final[k], weights[k]) for k in weights)


def test_without_validation_every_epoch_runs_and_the_last_is_kept(tmp_path: Path) -> None:
    spec = TrainingSpec(**{**SPEC.as_dict(), "early_stopping_patience": 1})
    result, log = _fit(ToyTask(), tmp_path, spec)
    assert [entry[2] for entry in log if isinstance(entry, tuple)] == [1, 2, 3, 4]
    assert "best_epoch" not in result.metrics and result.metrics["epoch"] == 4 and result.metrics["step"] == 16
    train = [m for m in log if isinstance(m, dict) and "train_loss" in m]
    assert train and {"train_accuracy", "tokens_per_second", "learning_rate", "total_steps"} <= set(train[0])


def test_the_typed_state_goes_through_a_checkpoint_as_json(tmp_path: Path) -> None:
    _fit(ToyTask(iter([0.9, 0.5, 0.7, 0.6])), tmp_path)
    written = json.loads((tmp_path / "ckpt-epoch-3" / "trainer_state.json").read_text())["state"]
    state = TrainingState.from_json(written)
    assert (state.epoch, state.step, state.trained_tokens, state.bad_epochs) == (3, 12, 3 * 20 * 8, 1)
    assert state.best is not None and (state.best.epoch, state.best.value) == (2, 0.5)
    assert state.best.metrics["valid_report"] == {"note": "toy"}
    assert TrainingState.from_json(json.loads(json.dumps(state.to_json()))) == state


def test_a_malformed_or_older_state_is_read_safely() -> None:
    state = TrainingState(epoch=2, step=9, trained_tokens=100, best=EpochScore(1, 0.25, {"a": 1}), bad_epochs=1)
    assert TrainingState.from_json(state.to_json()) == state
    for bad in ([], {"step": -1}, {"step": "3"}, {"epoch": True}, {"best": {"epoch": 1, "value": "x"}}, {"best": 3}):
        with pytest.raises(ValueError, match="checkpoint state"):
            TrainingState.from_json(bad)
    older_chat = {"epoch": 2, "step": 6, "trained_tokens": 50, "best_valid_loss": 0.4, "bad_epochs": 1}
    assert TrainingState.from_json(older_chat).best == EpochScore(0, 0.4, {})


def test_a_task_may_supply_its_own_batches(tmp_path: Path) -> None:
    """Pre-training, say, cuts its own batches: the loop trains on exactly those, in that order."""
    seen: list[list[int]] = []

    class InOrder(ToyTask):
        def epoch_batches(self, rng: Any, size: int, by_length: bool) -> list[list[Pair]]:
            return [self.train[k : k + 5] for k in range(0, len(self.train), 5)]

        def step(self, batch: list[Pair]) -> StepOutput:
            seen.append([next(i for i, x in enumerate(self.train) if x is example) for example in batch])
            return super().step(batch)

    result, _ = _fit(InOrder(), tmp_path, TrainingSpec(**{**SPEC.as_dict(), "n_epochs": 1, "batch_size": 5}))
    assert seen == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15, 16, 17, 18, 19]]
    assert result.metrics["step"] == 2  # four batches, a step every two
