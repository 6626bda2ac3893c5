"""Supervised chat fine-tuning of a causal LM: LoRA / IA3 through PEFT or full fine-tuning,
loss only on assistant tokens, bf16 autocast on CPUs where it is fast, per-epoch validation
and atomic checkpoints; resumes from the last complete checkpoint."""

from __future__ import annotations

import random
import time
from functools import partial
from typing import Any

import torch

from llmos.training.adapters import regularization, save_for_serving, wrap_model
from llmos.training.adversarial import FGM
from llmos.training.chat_data import IGNORE, Example, load_chat_file
from llmos.training.checkpoints import SERVABLE, resume_latest, save_epoch
from llmos.training.optim import Accumulation, Optimization
from llmos.training.packing import pack
from llmos.training.run import TrainingResult, TrainingRun
from llmos.training.spec import TrainingSpec


class Stopped(Exception):
    """Raised inside the loop when the job is cancelled or paused; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


GROUP_WINDOW_BATCHES = 32  # with group_by_length, examples are sorted by length within windows of this many batches


def _batches(examples: list[Example], size: int, rng: random.Random, by_length: bool = False) -> list[list[Example]]:
    """Shuffled batches. ``by_length``: each window of shuffled examples is sorted by length
    before it is cut into batches, and the batches are shuffled again, so a batch pads little
    while the order stays random from batch to batch (transformers' ``group_by_length``)."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    if by_length:
        window = size * GROUP_WINDOW_BATCHES
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda i: len(examples[i].input_ids))
        ]
    batches = [[examples[i] for i in order[k : k + size]] for k in range(0, len(order), size)]
    if by_length:
        rng.shuffle(batches)
    return batches


def _collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Token ids, labels and the model's masking inputs: a padding mask, or for packed rows the
    position ids that keep their conversations apart (padding then forms a segment of its own)."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    positions = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
        positions[i, :n] = torch.tensor(e.position_ids if e.position_ids is not None else range(n))
        positions[i, n:] = torch.arange(width - n)
    if any(e.position_ids is not None for e in batch):
        return ids, labels, {"position_ids": positions}
    return ids, labels, {"attention_mask": mask}


def _loss_and_accuracy(model: Any, batch: list[Example], pad_id: int, autocast: bool) -> tuple[torch.Tensor, int, int]:
    ids, labels, masking = _collate(batch, pad_id)
    # Logits only where a label follows (the assistant's tokens): the output layer is a fifth of
    # SmolLM2's weights, and most positions of a chat example are the prompt.
    keep = (labels[:, 1:] != IGNORE).any(dim=0).nonzero().flatten()
    if len(keep) == 0:
        keep = torch.tensor([0])
    targets = labels[:, keep + 1]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        # No cache: transformers builds the packed rows' block-diagonal mask only when there is none.
        logits = model(
            input_ids=ids, use_cache=False, logits_to_keep=keep + _virtual_tokens(model), **masking
        ).logits.float()
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE
    )
    counted = targets != IGNORE
    correct = int(((logits.argmax(-1) == targets) & counted).sum())
    return loss, correct, int(counted.sum())


def _virtual_tokens(model: Any) -> int:
    """Prompt tuning runs its virtual tokens before the real ones, so real positions shift by their number."""
    config = getattr(model, "peft_config", {}).get("default")
    if config is not None and str(config.peft_type).endswith("PROMPT_TUNING"):
        return int(config.num_virtual_tokens)
    return 0


def _scaled_loss(model: Any, batch: list[Example], pad_id: int, autocast: bool, scale: float) -> torch.Tensor:
    return _loss_and_accuracy(model, batch, pad_id, autocast)[0] / scale


@torch.no_grad()
def evaluate(model: Any, examples: list[Example], batch_size: int, pad_id: int, autocast: bool) -> dict[str, float]:
    model.eval()
    total_loss, correct, counted = 0.0, 0, 0
    for k in range(0, len(examples), batch_size):
        loss, c, n = _loss_and_accuracy(model, examples[k : k + batch_size], pad_id, autocast)
        total_loss += loss.item() * n
        correct, counted = correct + c, counted + n
    model.train()
    return {"valid_loss": total_loss / max(1, counted), "valid_mean_token_accuracy": correct / max(1, counted)}


def run_sft(run: TrainingRun) -> TrainingResult:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(run.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.base_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = load_chat_file(run.train_path, tokenizer, run.spec.max_seq_length)
    valid = load_chat_file(run.valid_path, tokenizer, run.spec.max_seq_length) if run.valid_path else []
    if not train:
        raise ValueError("no training example has an assistant token left after truncation to max_seq_length")
    if run.spec.packing:
        packed = pack(train, run.spec.max_seq_length)
        run.hooks.message(f"Packed {len(train)} conversations into {len(packed)} rows")
        train = packed
    total_steps = run.spec.total_steps(len(train))
    steps_per_epoch = total_steps // run.spec.n_epochs
    # With an adapter on a bf16-fast CPU the frozen base is kept in bf16: autocast would otherwise
    # cast every fp32 weight to bf16 again in each forward and backward. What trains stays fp32.
    frozen_bf16 = run.bf16 and run.spec.adapter != "full"
    base = AutoModelForCausalLM.from_pretrained(run.base_dir, dtype=torch.bfloat16 if frozen_bf16 else torch.float32)
    model = wrap_model(base, run.spec, "CAUSAL_LM", total_steps)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.train()
    opt = Optimization(model, run.spec, total_steps, weight_decay=0.0)
    fgm = FGM(model, run.spec.fgm_epsilon) if run.spec.fgm_epsilon else None
    state: dict[str, Any] = {"epoch": 0, "step": 0, "trained_tokens": 0, "best_valid_loss": None, "bad_epochs": 0}
    state = resume_latest(run.work_dir, model, opt.optimizer, opt.scheduler, run.hooks.message) or state
    run.hooks.message(
        f"Training {run.spec.adapter} on {len(train)} examples for {run.spec.n_epochs} epochs "
        f"({total_steps} steps, batch {run.spec.batch_size})"
    )
    log_every = max(1, steps_per_epoch // 10)
    metrics: dict[str, Any] = {}
    for epoch in range(int(state["epoch"]), run.spec.n_epochs):
        # Data order and dropout masks depend on the seed and the epoch only, so a run resumed from
        # a checkpoint ends with the very weights of one that was never stopped.
        torch.manual_seed(run.seed * 1000 + epoch)
        rng = random.Random(run.seed * 1000 + epoch)  # noqa: S311 -- data order, not secrets; the same on resume
        window_loss, window_correct, window_count, window_start = 0.0, 0, 0, time.perf_counter()
        batches = _batches(train, run.spec.batch_size, rng, run.spec.group_by_length)
        accumulation = Accumulation(len(batches), run.spec.gradient_accumulation_steps)
        for k, batch in enumerate(batches):
            reason = run.hooks.control()
            if reason:
                raise Stopped(reason)
            loss, correct, counted = _loss_and_accuracy(model, batch, pad_id, run.bf16)
            penalty = regularization(model)
            scale = accumulation.scale(k)
            ((loss if penalty is None else loss + penalty) / scale).backward()
            if fgm is not None:
                fgm.attack(partial(_scaled_loss, model, batch, pad_id, run.bf16, scale))
            window_loss += loss.item() * counted
            window_correct, window_count = window_correct + correct, window_count + counted
            state["trained_tokens"] += sum(len(e.input_ids) for e in batch)
            if not accumulation.steps_after(k):
                continue
            opt.step(state)
            if state["step"] % log_every == 0:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "step": state["step"],
                    "train_loss": window_loss / max(1, window_count),
                    "train_mean_token_accuracy": window_correct / max(1, window_count),
                    "learning_rate": opt.learning_rate,
                    "tokens_per_second": window_count / elapsed,
                    "epoch": epoch + 1,
                    "total_steps": total_steps,
                }
                run.hooks.metrics(metrics)
                window_loss, window_correct, window_count, window_start = 0.0, 0, 0, time.perf_counter()
        state["epoch"] = epoch + 1
        epoch_metrics = {"step": state["step"], "epoch": epoch + 1, **metrics}
        if valid:
            epoch_metrics.update(evaluate(model, valid, run.spec.batch_size, pad_id, run.bf16))
            run.hooks.metrics(
                {"step": state["step"], **{k: v for k, v in epoch_metrics.items() if k.startswith("valid")}}
            )
        directory = save_epoch(
            run.work_dir, epoch + 1, model=model, optimizer=opt.optimizer, scheduler=opt.scheduler, state=state
        )
        if save_for_serving(model, run.spec, directory / SERVABLE, final=False):  # served as <model>:ckpt-step-N
            tokenizer.save_pretrained(directory / SERVABLE)
        run.hooks.checkpoint(int(state["step"]), epoch + 1, epoch_metrics, directory)
        metrics = epoch_metrics
        if _should_stop_early(run.spec, state, epoch_metrics):
            run.hooks.message(f"Early stopping after epoch {epoch + 1}: validation loss stopped improving")
            break
    out = run.work_dir / "result"
    save_for_serving(model, run.spec, out)
    tokenizer.save_pretrained(out)
    return TrainingResult(model_dir=out, metrics=metrics, trained_tokens=int(state["trained_tokens"]))


def _should_stop_early(spec: TrainingSpec, state: dict[str, Any], metrics: dict[str, Any]) -> bool:
    if spec.early_stopping_patience is None or "valid_loss" not in metrics:
        return False
    best = state.get("best_valid_loss")
    if best is None or metrics["valid_loss"] < best:
        state["best_valid_loss"], state["bad_epochs"] = metrics["valid_loss"], 0
        return False
    state["bad_epochs"] = int(state.get("bad_epochs", 0)) + 1
    return bool(state["bad_epochs"] >= spec.early_stopping_patience)
