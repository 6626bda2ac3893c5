"""Sequence classification fine-tuning of an encoder (e.g. all-MiniLM-L6-v2): full or LoRA,
evaluated with accuracy, macro-F1 and a per-class report; same checkpoints and hooks as chat SFT."""

from __future__ import annotations

import csv
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmos.training.adapters import merged, wrap_model
from llmos.training.checkpoints import resume_latest, save_epoch
from llmos.training.datasets import LABEL_COLUMNS, TEXT_COLUMNS, jsonl_objects, read_lines
from llmos.training.sft import Hooks, Stopped, TrainingResult, lr_schedule
from llmos.training.spec import TrainingSpec


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str


def load_classification_file(path: Path) -> list[LabelledText]:
    lines = read_lines(path)
    first = next(line for line in lines if line.strip())
    if first.lstrip().startswith("{"):
        return [LabelledText(str(r["text"]), str(r["label"])) for _, r in jsonl_objects(lines)]
    sep = "\t" if "\t" in first else ","
    reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter=sep)
    fields = {(f or "").strip().lower(): f for f in reader.fieldnames or []}
    text = next(fields[c] for c in ("text", "sentence") if c in fields and c in TEXT_COLUMNS)
    label = next(fields[c] for c in ("label", "category") if c in fields and c in LABEL_COLUMNS)
    return [LabelledText(row[text], str(row[label]).strip()) for row in reader]


def classification_report(gold: list[int], predicted: list[int], labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision / recall / F1 / support."""
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for index, name in enumerate(labels):
        tp = sum(1 for g, p in zip(gold, predicted, strict=True) if g == p == index)
        fp = sum(1 for g, p in zip(gold, predicted, strict=True) if p == index and g != index)
        fn = sum(1 for g, p in zip(gold, predicted, strict=True) if g == index and p != index)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        support = tp + fn
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support:
            f1s.append(f1)
    accuracy = sum(1 for g, p in zip(gold, predicted, strict=True) if g == p) / max(1, len(gold))
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / max(1, len(f1s)), "per_class": per_class}


@torch.no_grad()
def _predict(model: Any, tokenizer: Any, texts: list[str], max_len: int, batch_size: int) -> list[int]:
    model.eval()
    out: list[int] = []
    for k in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[k : k + batch_size], truncation=True, max_length=max_len, padding=True, return_tensors="pt"
        )
        out.extend(model(**enc).logits.argmax(-1).tolist())
    model.train()
    return out


def run_classification(
    *,
    base_dir: Path,
    train_path: Path,
    valid_path: Path | None,
    spec: TrainingSpec,
    seed: int,
    work_dir: Path,
    hooks: Hooks,
    bf16: bool,
) -> TrainingResult:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    train = load_classification_file(train_path)
    valid = load_classification_file(valid_path) if valid_path else []
    labels = sorted({x.label for x in train})
    index = {name: i for i, name in enumerate(labels)}
    unseen = sorted({x.label for x in valid} - set(labels))
    if unseen:
        raise ValueError(f"validation labels not in the training file: {unseen[:5]}")
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id=index, dtype=torch.float32
    )
    model = wrap_model(model, spec, "SEQ_CLS")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.learning_rate, weight_decay=0.01)
    steps_per_epoch = math.ceil(math.ceil(len(train) / spec.batch_size) / spec.gradient_accumulation_steps)
    total_steps = steps_per_epoch * spec.n_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(spec, total_steps))
    state: dict[str, Any] = {"epoch": 0, "step": 0, "trained_tokens": 0}
    state = resume_latest(work_dir, model, optimizer, scheduler, hooks.message) or state
    hooks.message(
        f"Training {spec.adapter} sequence classification on {len(train)} examples, {len(labels)} labels, "
        f"{spec.n_epochs} epochs ({total_steps} steps)"
    )
    log_every = max(1, steps_per_epoch // 10)
    metrics: dict[str, Any] = {}
    for epoch in range(int(state["epoch"]), spec.n_epochs):
        order = list(range(len(train)))
        random.Random(seed * 1000 + epoch).shuffle(order)  # noqa: S311 -- data order, the same on resume
        window_loss, window_correct, window_count = 0.0, 0, 0
        for k in range(0, len(order), spec.batch_size):
            reason = hooks.control()
            if reason:
                raise Stopped(reason)
            batch = [train[i] for i in order[k : k + spec.batch_size]]
            enc = tokenizer(
                [x.text for x in batch],
                truncation=True,
                max_length=spec.max_seq_length,
                padding=True,
                return_tensors="pt",
            )
            target = torch.tensor([index[x.label] for x in batch])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(**enc).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
            (loss / spec.gradient_accumulation_steps).backward()
            window_loss += loss.item() * len(batch)
            window_correct += int((logits.argmax(-1) == target).sum())
            window_count += len(batch)
            state["trained_tokens"] += int(enc["attention_mask"].sum())
            if (k // spec.batch_size + 1) % spec.gradient_accumulation_steps:
                continue
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            if state["step"] % log_every == 0:
                metrics = {
                    "step": state["step"],
                    "train_loss": window_loss / window_count,
                    "train_accuracy": window_correct / window_count,
                    "learning_rate": scheduler.get_last_lr()[0],
                    "epoch": epoch + 1,
                    "total_steps": total_steps,
                }
                hooks.metrics(metrics)
                window_loss, window_correct, window_count = 0.0, 0, 0
        state["epoch"] = epoch + 1
        epoch_metrics: dict[str, Any] = {"step": state["step"], "epoch": epoch + 1}
        if valid:
            predicted = _predict(model, tokenizer, [x.text for x in valid], spec.max_seq_length, 64)
            report = classification_report([index[x.label] for x in valid], predicted, labels)
            epoch_metrics.update(
                valid_accuracy=report["accuracy"], valid_macro_f1=report["macro_f1"], valid_report=report["per_class"]
            )
            hooks.metrics(
                {"step": state["step"], "valid_accuracy": report["accuracy"], "valid_macro_f1": report["macro_f1"]}
            )
        directory = save_epoch(work_dir, epoch + 1, model=model, optimizer=optimizer, scheduler=scheduler, state=state)
        hooks.checkpoint(int(state["step"]), epoch + 1, epoch_metrics, directory)
        metrics = epoch_metrics
    merged_model = merged(model, spec)
    out = work_dir / "result"
    merged_model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return TrainingResult(model_dir=out, metrics=metrics, trained_tokens=int(state["trained_tokens"]))
