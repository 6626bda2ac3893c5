"""What the encoder tasks (sequence classification, token classification) share on top of the
training loop: a base model with a fresh head for the training file's labels, the labelled
step, and the saving of merged weights; the best validation epoch is the result."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from llmos.training.adapters import merged, save_merged_copy
from llmos.training.device import bf16_autocast, to_model
from llmos.training.loop import StepOutput, TrainingTask
from llmos.training.run import TrainingRun

E = TypeVar("E")
IGNORE = -100
"""A label position that counts for nothing (special tokens, padding, a word's later sub-words)."""


def label_names(train: Iterable[str], valid: Iterable[str], what: str) -> list[str]:
    """The training file's labels, sorted (a head's output ``i`` is label ``i``); ``ValueError``
    when validation has one training lacks, since no head output could predict it."""
    names = sorted(set(train))
    unseen = sorted(set(valid) - set(names))
    if unseen:
        raise ValueError(f"validation {what} not in the training file: {unseen[:5]}")
    return names


@dataclass(frozen=True)
class EncoderData(Generic[E]):
    """The base's tokenizer and a run's training and validation examples."""

    tokenizer: Any
    train: list[E]
    valid: list[E]
    """Empty without a validation file."""


def encoder_inputs(run: TrainingRun, load: Callable[[Path], list[E]]) -> EncoderData[E]:
    """The run's data (examples read by ``load``), with torch's random state seeded for the model
    built next."""
    from transformers import AutoTokenizer

    torch.manual_seed(run.seed)
    tokenizer = AutoTokenizer.from_pretrained(run.base_dir)
    return EncoderData(tokenizer, load(run.train_path), load(run.valid_path) if run.valid_path else [])


def encoder_with_head(auto_class: Any, base_dir: Path, labels: list[str]) -> Any:
    """The base encoder with a fresh head for ``labels`` (``auto_class``, e.g. transformers'
    ``AutoModelForSequenceClassification``), in float32, not yet wrapped by a method."""
    return auto_class.from_pretrained(
        base_dir,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        dtype=torch.float32,
        ignore_mismatched_sizes=True,  # a classifier base (other labels, another task) brings a head of another shape
    )


class EncoderTask(TrainingTask[E]):
    """An encoder task: its checkpoints and result are the merged weights and the tokenizer
    (served like any model), and the best validation epoch is kept."""

    weight_decay = 0.01

    def __init__(self, run: TrainingRun, model: Any, data: EncoderData[E]) -> None:
        self.run, self.model, self.tokenizer = run, model, data.tokenizer
        self.train, self.valid = data.train, data.valid

    def labelled_step(self, inputs: Any, labels: torch.Tensor) -> StepOutput:
        """Cross-entropy of the head's logits against ``labels`` (one per example, or one per token
        with ``IGNORE`` where nothing is learnt), with how many it got right."""
        tokens = int(inputs["attention_mask"].sum())
        inputs, labels = to_model(self.model, inputs), to_model(self.model, labels)
        with bf16_autocast(self.model, self.run.bf16):
            logits = self.model(**inputs).logits
        counted = labels != IGNORE
        if not counted.any():  # every word cut off or untokenizable: nothing to learn, and no NaN
            return StepOutput(loss=logits.sum() * 0.0, correct=0, counted=0, tokens=tokens)
        flat = logits.float().reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE)
        correct = int(((logits.argmax(-1) == labels) & counted).sum())
        return StepOutput(loss=loss, correct=correct, counted=int(counted.sum()), tokens=tokens)

    def save_checkpoint_model(self, directory: Path) -> None:
        save_merged_copy(self.model, self.run.spec, directory)
        self.tokenizer.save_pretrained(directory)

    def save_result(self, directory: Path) -> None:
        merged(self.model, self.run.spec).save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
