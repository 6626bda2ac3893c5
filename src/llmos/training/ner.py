"""Token classification (NER) fine-tuning of an encoder (e.g. all-MiniLM-L6-v2): full, LoRA or
IA3. Each word's tag is learnt on its first sub-word (the others are ignored, -100), and the
model is scored on whole entities (seqeval, CoNLL-2000 rules): precision, recall, F1 and a
per-type report. The loop is the shared one (see loop and encoder_task)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from llmos.training.adapters import input_limit, wrap_model
from llmos.training.datasets import conll_sentences, jsonl_objects, read_lines
from llmos.training.device import to_model
from llmos.training.encoder_task import IGNORE, EncoderData, EncoderTask, encoder_inputs, encoder_with_head, label_names
from llmos.training.loop import Selection, StepOutput, fit
from llmos.training.run import TrainingResult, TrainingRun

OUTSIDE = "O"


@dataclass(frozen=True)
class TaggedSentence:
    tokens: tuple[str, ...]
    tags: tuple[str, ...]


def load_token_file(path: Path) -> list[TaggedSentence]:
    """A token-classification file (JSONL ``tokens``/``tags`` or CoNLL), already validated at upload."""
    lines = read_lines(path)
    first = next((line for line in lines if line.strip()), "")
    if first.lstrip().startswith("{"):
        return [TaggedSentence(tuple(r["tokens"]), tuple(r["tags"])) for _, r in jsonl_objects(lines)]
    return [TaggedSentence(tuple(tokens), tuple(tags)) for _, tokens, tags in conll_sentences(lines)]


def align_labels(word_ids: Sequence[int | None], tags: Sequence[int]) -> list[int]:
    """Per sub-word position: the word's tag id on its first sub-word, IGNORE elsewhere (special
    tokens, padding, continuation pieces)."""
    labels: list[int] = []
    previous: int | None = None
    for word in word_ids:
        labels.append(IGNORE if word is None or word == previous else tags[word])
        previous = word
    return labels


def entity_report(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, Any]:
    """Entity-level micro precision / recall / F1 and per-type precision / recall / F1 / support
    (seqeval's default mode, which scores like conlleval)."""
    from seqeval.metrics import classification_report

    report = classification_report(gold, predicted, output_dict=True, zero_division=0)
    micro = report.get("micro avg", {})
    return {
        "precision": float(micro.get("precision", 0.0)),
        "recall": float(micro.get("recall", 0.0)),
        "f1": float(micro.get("f1-score", 0.0)),
        "per_type": {
            name: {
                "precision": float(row["precision"]),
                "recall": float(row["recall"]),
                "f1": float(row["f1-score"]),
                "support": int(row["support"]),
            }
            for name, row in report.items()
            if not name.endswith(" avg")
        },
    }


class WordTagger:
    """Encodes tagged sentences for a token-classification model and reads its word-level tags."""

    def __init__(self, model: Any, tokenizer: Any, tags: list[str], max_length: int) -> None:
        if not tokenizer.is_fast:
            raise ValueError("token classification needs a fast tokenizer (it maps sub-words to words)")
        self.model, self.tokenizer, self.tags, self.max_length = model, tokenizer, tags, max_length
        self.index = {tag: i for i, tag in enumerate(tags)}

    def encode(self, batch: Sequence[TaggedSentence]) -> tuple[Any, torch.Tensor]:
        enc = self.tokenizer(
            [list(s.tokens) for s in batch],
            is_split_into_words=True,
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        labels = [
            align_labels(enc.word_ids(i), [self.index.get(t, IGNORE) for t in s.tags]) for i, s in enumerate(batch)
        ]
        return enc, torch.tensor(labels)

    @torch.no_grad()
    def predict(self, sentences: Sequence[TaggedSentence], batch_size: int = 64) -> list[list[str]]:
        """A tag for every word; a word cut off by ``max_length`` (or that tokenizes to nothing) is O."""
        self.model.eval()
        out: list[list[str]] = []
        for k in range(0, len(sentences), batch_size):
            batch = sentences[k : k + batch_size]
            enc, _ = self.encode(batch)
            best = self.model(**to_model(self.model, enc)).logits.argmax(-1).tolist()
            for i, sentence in enumerate(batch):
                words = [OUTSIDE] * len(sentence.tokens)
                previous: int | None = None
                for position, word in enumerate(enc.word_ids(i)):
                    if word is not None and word != previous:
                        words[word] = self.tags[best[i][position]]
                    previous = word
                out.append(words)
        self.model.train()
        return out


class TokenClassificationTask(EncoderTask[TaggedSentence]):
    selection = Selection(metric="valid_f1", higher_is_better=True, keep_best=True)

    def __init__(self, run: TrainingRun, tagger: WordTagger, data: EncoderData[TaggedSentence]) -> None:
        super().__init__(run, tagger.model, data)
        self.tagger = tagger
        self.description = f"token classification on {len(data.train)} sentences, {len(tagger.tags)} tags"

    @staticmethod
    def length(sentence: TaggedSentence) -> int:
        """What ``group_by_length`` batches by: characters of the sentence's words, which order
        sentences about as their word pieces would, without tokenising them."""
        return sum(len(word) for word in sentence.tokens)

    def step(self, batch: list[TaggedSentence]) -> StepOutput:
        enc, labels = self.tagger.encode(batch)
        return self.labelled_step(enc, labels)

    def evaluate(self) -> dict[str, Any] | None:
        if not self.valid:
            return None
        gold = [list(s.tags) for s in self.valid]
        predicted = self.tagger.predict(self.valid)
        report = entity_report(gold, predicted)
        words = sum(len(g) for g in gold)
        right = sum(g == p for gs, ps in zip(gold, predicted, strict=True) for g, p in zip(gs, ps, strict=True))
        return {
            "valid_precision": report["precision"],
            "valid_recall": report["recall"],
            "valid_f1": report["f1"],
            "valid_token_accuracy": right / max(1, words),
            "valid_report": report["per_type"],
        }


def run_token_classification(run: TrainingRun) -> TrainingResult:
    from transformers import AutoModelForTokenClassification

    data = encoder_inputs(run, load_token_file)
    tags = label_names((t for s in data.train for t in s.tags), (t for s in data.valid for t in s.tags), "tags")
    model = encoder_with_head(AutoModelForTokenClassification, run.base_dir, tags)
    model = wrap_model(model, run.spec, "TOKEN_CLS", run.spec.total_steps(len(data.train))).to(run.device)
    tagger = WordTagger(model, data.tokenizer, tags, input_limit(model, run.spec))
    return fit(TokenClassificationTask(run, tagger, data), run)
