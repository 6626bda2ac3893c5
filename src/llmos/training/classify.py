"""Sequence classification fine-tuning of an encoder (e.g. all-MiniLM-L6-v2): full, LoRA or IA3,
evaluated with accuracy, macro-F1 and a per-class report; the loop is the shared one (see loop)."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from llmos.engine.torch_backend.head_pooling import install_pooling, set_pooling
from llmos.training.adapters import input_limit, wrap_model
from llmos.training.augment import augment, embedding_synonyms
from llmos.training.datasets import LABEL_COLUMNS, TEXT_COLUMNS, jsonl_objects, read_lines
from llmos.training.device import to_model
from llmos.training.encoder_task import EncoderData, EncoderTask, encoder_inputs, encoder_with_head, label_names
from llmos.training.loop import Selection, StepOutput, fit
from llmos.training.run import TrainingResult, TrainingRun


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str
    text_pair: str | None = None
    """The second text of a pair read together with ``text`` (a cross-encoder's passage)."""


def load_classification_file(path: Path) -> list[LabelledText]:
    lines = read_lines(path)
    first = next(line for line in lines if line.strip())
    if first.lstrip().startswith("{"):
        return [
            LabelledText(str(r["text"]), str(r["label"]), str(r["text_pair"]) if "text_pair" in r else None)
            for _, r in jsonl_objects(lines)
        ]
    sep = "\t" if "\t" in first else ","
    reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter=sep)
    fields = {(f or "").strip().lower(): f for f in reader.fieldnames or []}
    text = next(fields[c] for c in ("text", "sentence") if c in fields and c in TEXT_COLUMNS)
    label = next(fields[c] for c in ("label", "category") if c in fields and c in LABEL_COLUMNS)
    pair = fields.get("text_pair")
    return [LabelledText(row[text], str(row[label]).strip(), row[pair] if pair else None) for row in reader]


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


def encode(tokenizer: Any, batch: list[LabelledText], max_length: int) -> Any:
    """A batch's texts (or pairs of texts, read together), tokenised and padded."""
    pairs = [x.text_pair for x in batch] if batch and batch[0].text_pair is not None else None
    return tokenizer(
        [x.text for x in batch], pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt"
    )


@torch.no_grad()
def _predict(model: Any, tokenizer: Any, examples: list[LabelledText], max_len: int, batch_size: int) -> list[int]:
    model.eval()
    out: list[int] = []
    for k in range(0, len(examples), batch_size):
        inputs = to_model(model, encode(tokenizer, examples[k : k + batch_size], max_len))
        out.extend(model(**inputs).logits.argmax(-1).tolist())
    model.train()
    return out


class ClassificationTask(EncoderTask[LabelledText]):
    selection = Selection(metric="valid_accuracy", higher_is_better=True, keep_best=True)

    def __init__(self, run: TrainingRun, model: Any, data: EncoderData[LabelledText], labels: list[str]) -> None:
        super().__init__(run, model, data)
        self.labels, self.index = labels, {name: i for i, name in enumerate(labels)}
        self.max_length = input_limit(model, run.spec)
        self.description = f"sequence classification on {len(data.train)} examples, {len(labels)} labels"

    @staticmethod
    def length(example: LabelledText) -> int:
        """What ``group_by_length`` batches by: characters of both texts (a pair's passage is most of
        its length), which order examples about as tokens would, without tokenising them."""
        return len(example.text) + len(example.text_pair or "")

    def step(self, batch: list[LabelledText]) -> StepOutput:
        enc = encode(self.tokenizer, batch, self.max_length)
        return self.labelled_step(enc, torch.tensor([self.index[x.label] for x in batch]))

    def evaluate(self) -> dict[str, Any] | None:
        if not self.valid:
            return None
        predicted = _predict(self.model, self.tokenizer, self.valid, self.max_length, 64)
        report = classification_report([self.index[x.label] for x in self.valid], predicted, self.labels)
        return {
            "valid_accuracy": report["accuracy"],
            "valid_macro_f1": report["macro_f1"],
            "valid_report": report["per_class"],
        }


def run_classification(run: TrainingRun) -> TrainingResult:
    from transformers import AutoModelForSequenceClassification

    data = encoder_inputs(run, load_classification_file)
    labels = label_names((x.label for x in data.train), (x.label for x in data.valid), "labels")
    model = encoder_with_head(AutoModelForSequenceClassification, run.base_dir, labels)
    model = set_pooling(model, run.spec.pooling) if run.spec.pooling else install_pooling(model)
    if run.spec.augmentation_probability:
        words = {w.lower() for x in data.train for w in x.text.split()}
        synonyms = embedding_synonyms(words, data.tokenizer, model.get_input_embeddings().weight.detach())
        train = augment(
            data.train,
            lambda x: x.text,
            lambda x, text: replace(x, text=text),
            synonyms,
            probability=run.spec.augmentation_probability,
            copies=run.spec.augmentation_copies,
            seed=run.seed,
        )
        run.hooks.message(
            f"Augmented {len(data.train)} training examples with {len(train) - len(data.train)} EDA variants"
        )
        data = replace(data, train=train)
    model = wrap_model(model, run.spec, "SEQ_CLS", run.spec.total_steps(len(data.train))).to(run.device)
    return fit(ClassificationTask(run, model, data, labels), run)
