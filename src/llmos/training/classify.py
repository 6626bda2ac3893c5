"""Sequence classification fine-tuning of an encoder (e.g. all-MiniLM-L6-v2): full, LoRA or IA3,
evaluated with accuracy, macro-F1 and a per-class report; the loop is the one every encoder task shares."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmos.training.adapters import input_limit, wrap_model
from llmos.training.augment import augment, embedding_synonyms
from llmos.training.datasets import LABEL_COLUMNS, TEXT_COLUMNS, jsonl_objects, read_lines
from llmos.training.encoder_loop import EncoderTask, StepOutput, train_encoder
from llmos.training.run import TrainingResult, TrainingRun


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


def run_classification(run: TrainingRun) -> TrainingResult:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(run.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.base_dir)
    train = load_classification_file(run.train_path)
    valid = load_classification_file(run.valid_path) if run.valid_path else []
    labels = sorted({x.label for x in train})
    index = {name: i for i, name in enumerate(labels)}
    unseen = sorted({x.label for x in valid} - set(labels))
    if unseen:
        raise ValueError(f"validation labels not in the training file: {unseen[:5]}")
    model = AutoModelForSequenceClassification.from_pretrained(
        run.base_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id=index,
        dtype=torch.float32,
        ignore_mismatched_sizes=True,  # a classifier base (other labels, or an NER head) brings a head of another shape
    )
    if run.spec.augmentation_probability:
        words = {w.lower() for x in train for w in x.text.split()}
        synonyms = embedding_synonyms(words, tokenizer, model.get_input_embeddings().weight.detach())
        original = len(train)
        train = augment(
            train,
            lambda x: x.text,
            lambda x, text: LabelledText(text, x.label),
            synonyms,
            probability=run.spec.augmentation_probability,
            copies=run.spec.augmentation_copies,
            seed=run.seed,
        )
        run.hooks.message(f"Augmented {original} training examples with {len(train) - original} EDA variants")
    model = wrap_model(model, run.spec, "SEQ_CLS", run.spec.total_steps(len(train)))
    max_length = input_limit(model, run.spec)

    def step(batch: list[LabelledText]) -> StepOutput:
        enc = tokenizer(
            [x.text for x in batch],
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        target = torch.tensor([index[x.label] for x in batch])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=run.bf16):
            logits = model(**enc).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), target)
        correct = int((logits.argmax(-1) == target).sum())
        return StepOutput(loss=loss, correct=correct, counted=len(batch), tokens=int(enc["attention_mask"].sum()))

    def evaluate() -> dict[str, Any]:
        predicted = _predict(model, tokenizer, [x.text for x in valid], max_length, 64)
        report = classification_report([index[x.label] for x in valid], predicted, labels)
        return {
            "valid_accuracy": report["accuracy"],
            "valid_macro_f1": report["macro_f1"],
            "valid_report": report["per_class"],
        }

    task = EncoderTask(
        description=f"sequence classification on {len(train)} examples, {len(labels)} labels",
        train=train,
        step=step,
        evaluate=evaluate if valid else None,
        select="valid_accuracy",
    )
    return train_encoder(model, tokenizer, task, run)
