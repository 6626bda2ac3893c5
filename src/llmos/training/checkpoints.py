"""Training checkpoints written atomically (a temporary directory renamed into place), in
safetensors and JSON only, so resuming never unpickles anything. A full disk while writing one
removes the half-written directory and leaves every earlier checkpoint as it was."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from llmos.errors import ArtifactError, InsufficientStorageError, NotFoundError
from llmos.registry.store import link_or_copy, safe_join
from llmos.training.adapters import MethodState, method_state, restore_method_state
from llmos.training.run import CheckpointSource

SERVABLE = "model"
"""A checkpoint's sub-directory holding the model as the engine serves it (where the method allows)."""
METHOD = "method.safetensors"
"""A checkpoint's file of the PEFT method's own training state, when it has one (AdaLoRA's importance scores)."""
UNRESTORABLE = (ArtifactError, NotFoundError, FileNotFoundError, SafetensorError, ValueError)
"""What fetching and loading a checkpoint raise when it is damaged or gone: the store's damage
(``hash_mismatch``) or missing record or blob, a missing local file, a file that is no safetensors,
weights that do not fit the model. Not a full disk or an I/O error: those are no verdict on the
checkpoint, and keeping a worse epoch for them would be wrong."""


def save_checkpoint(
    directory: Path,
    *,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    method: MethodState | None = None,
    files: dict[str, Path] | None = None,
) -> Path:
    """Write the checkpoint ``directory``; ``files`` (relative path -> a file) are linked into it."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, weights, optimizer, scheduler, state, method or MethodState(), files or {})
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written checkpoint left behind
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise InsufficientStorageError(
                f"no space left on device while writing checkpoint {directory.name}; the previous complete "
                "checkpoint is kept. Free disk space and resume the job."
            ) from exc
        raise
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # Serialised in memory and written by Python, not by safetensors' own file writer: that one
    # reports a full disk as a SafetensorError carrying only a message, ours as OSError(ENOSPC).
    path.write_bytes(save(tensors))


def _write(
    tmp: Path,
    weights: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    method: MethodState,
    files: dict[str, Path],
) -> None:
    tmp.mkdir(parents=True)
    for rel, src in files.items():
        link_or_copy(src, safe_join(tmp, rel))
    _write_safetensors({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "trainable.safetensors")
    opt = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, slot in opt["state"].items():
        for name, value in slot.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    _write_safetensors(tensors or {"_empty": torch.zeros(1)}, tmp / "optimizer.safetensors")
    if method.tensors:
        _write_safetensors({k: v.detach().contiguous().cpu() for k, v in method.tensors.items()}, tmp / METHOD)
    meta = {
        "state": state,
        "param_groups": opt["param_groups"],
        "scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "method": method.meta,
    }
    (tmp / "trainer_state.json").write_text(json.dumps(meta, default=float))
    for f in tmp.rglob("*"):  # durable before the rename makes the checkpoint visible
        if f.is_file():
            with f.open("rb") as handle:
                os.fsync(handle.fileno())


def load_weights(directory: Path, model: torch.nn.Module) -> None:
    """Copy a checkpoint's trainable weights into ``model`` (optimizer state untouched)."""
    weights = load_file(directory / "trainable.safetensors")
    params = dict(model.named_parameters())
    missing = set(weights) - set(params)
    if missing:
        raise ValueError(f"checkpoint has unknown parameters: {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)


def load_checkpoint(
    directory: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    load_weights(directory, model)
    meta = json.loads((directory / "trainer_state.json").read_text())
    tensors = load_file(directory / "optimizer.safetensors")
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key == "_empty":
            continue
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, extra in meta["scalars"].items():
        state.setdefault(int(index), {}).update(extra)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    method = directory / METHOD
    restore_method_state(model, MethodState(load_file(method) if method.is_file() else {}, meta.get("method", {})))
    return dict(meta["state"])


def epoch_dir(work_dir: Path, epoch: int) -> Path:
    """Where the checkpoint at the end of ``epoch`` is written in a run's work directory."""
    return work_dir / f"ckpt-epoch-{epoch}"


class LocalCheckpoints:
    """The complete checkpoints in a run's work directory (a ``.tmp`` one never counts)."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir

    def latest_epoch(self, before: int | None = None) -> int | None:
        epochs = [
            int(p.name.rsplit("-", 1)[1])
            for p in self.work_dir.glob("ckpt-epoch-*")
            if p.name.rsplit("-", 1)[1].isdigit()
        ]
        return max((e for e in epochs if before is None or e < before), default=None)

    def fetch(self, epoch: int) -> Path:
        return epoch_dir(self.work_dir, epoch)


def save_epoch(
    work_dir: Path,
    epoch: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    files: dict[str, Path] | None = None,
) -> Path:
    """The checkpoint at the end of ``epoch``: the trainable weights only (an adapter is small),
    and the task's ``files`` (``TrainingTask.checkpoint_files``)."""
    return save_checkpoint(
        epoch_dir(work_dir, epoch),
        weights={n: p for n, p in model.named_parameters() if p.requires_grad},
        optimizer=optimizer,
        scheduler=scheduler,
        state=state,
        method=method_state(model),
        files=files,
    )


def latest_restorable(source: CheckpointSource, report: Callable[[str], None]) -> tuple[int, Path] | None:
    """The newest checkpoint ``source`` lays out whole: its epoch and directory. One found damaged
    in the store (``hash_mismatch``) is skipped, and said so through ``report``, for the newest
    earlier one; when every one is damaged, the newest one's error is raised."""
    epoch = source.latest_epoch()
    first_damage: ArtifactError | None = None
    while epoch is not None:
        try:
            return epoch, source.fetch(epoch)
        except ArtifactError as exc:
            if exc.code != "hash_mismatch":
                raise
            first_damage = first_damage or exc
            earlier = source.latest_epoch(before=epoch)
            instead = f"trying epoch {earlier}" if earlier is not None else "no earlier checkpoint"
            report(f"Skipped the checkpoint of epoch {epoch}: {exc}; {instead}")
            epoch = earlier
    if first_damage is not None:
        raise first_damage
    return None


class Restored:
    """``source`` with the checkpoint a resume starts from already laid out, so a run that needed
    it early (pre-training's tokenizer) and the training loop restore it once: its ``latest_epoch``
    is that checkpoint's (a newer one was found damaged)."""

    def __init__(self, source: CheckpointSource, epoch: int, directory: Path) -> None:
        self.source, self.epoch, self.directory = source, epoch, directory

    def latest_epoch(self, before: int | None = None) -> int | None:
        return self.epoch if before is None or self.epoch < before else self.source.latest_epoch(before)

    def fetch(self, epoch: int) -> Path:
        return self.directory if epoch == self.epoch else self.source.fetch(epoch)


def resume_latest(
    source: CheckpointSource,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    report: Callable[[str], None],
) -> dict[str, Any] | None:
    """Load the newest checkpoint ``source`` lays out whole (``latest_restorable``)."""
    found = latest_restorable(source, report)
    if found is None:
        return None
    state = load_checkpoint(found[1], model=model, optimizer=optimizer, scheduler=scheduler)
    report(f"Resumed from checkpoint at step {state['step']} (epoch {state['epoch']})")
    return state
