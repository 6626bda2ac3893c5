"""Task metrics of a run beyond OpenAI's pass/fail: a classification report (per-class precision,
recall and F1, macro and micro averages, the confusion matrix) and extractive QA's exact match and
token F1 (SQuAD's normalisation), over the predictions and references a run's items hold."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from llmos.evals.templates import as_text, lookup, references, render

TASKS = ("classification", "extractive_qa")


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def _f1(precision: float, recall: float) -> float:
    return _ratio(2 * precision * recall, precision + recall)


def classification_report(references: Sequence[str], predictions: Sequence[str]) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support; accuracy; macro averages over the reference
    classes; and the confusion matrix (rows: reference, columns: prediction) over every label seen."""
    if len(references) != len(predictions):
        raise ValueError("references and predictions must have the same length")
    labels = sorted(set(references) | set(predictions))
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for reference, prediction in zip(references, predictions, strict=True):
        matrix[index[reference]][index[prediction]] += 1
    per_class = {}
    for label, i in index.items():
        true_positive = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        support = sum(matrix[i])
        precision, recall = _ratio(true_positive, predicted), _ratio(true_positive, support)
        per_class[label] = {"precision": precision, "recall": recall, "f1": _f1(precision, recall), "support": support}
    present = [per_class[label] for label in labels if per_class[label]["support"]]
    correct = sum(matrix[i][i] for i in range(len(labels)))
    return {
        "task": "classification",
        "items": len(references),
        "accuracy": _ratio(correct, len(references)),
        "macro_precision": _ratio(sum(c["precision"] for c in present), len(present)),
        "macro_recall": _ratio(sum(c["recall"] for c in present), len(present)),
        "macro_f1": _ratio(sum(c["f1"] for c in present), len(present)),
        "per_class": per_class,
        "labels": labels,
        "confusion_matrix": matrix,
    }


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    return _f1(_ratio(common, len(predicted)), _ratio(common, len(expected)))


def qa_report(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, Any]:
    """Exact match and token F1, each the best over an item's reference answers, averaged."""
    if len(references) != len(predictions):
        raise ValueError("references and predictions must have the same length")
    exact = [
        max(float(normalize_answer(p) == normalize_answer(r)) for r in refs) if refs else 0.0
        for refs, p in zip(references, predictions, strict=True)
    ]
    f1 = [max(token_f1(p, r) for r in refs) if refs else 0.0 for refs, p in zip(references, predictions, strict=True)]
    return {
        "task": "extractive_qa",
        "items": len(predictions),
        "exact_match": _ratio(sum(exact), len(exact)),
        "f1": _ratio(sum(f1), len(f1)),
    }


def run_report(task: str, namespaces: Sequence[dict[str, Any]], prediction: str, reference: str) -> dict[str, Any]:
    """``task``'s report over a run's graded items: ``prediction`` and ``reference`` are templates
    (``{{sample.output_text}}``, ``{{item.label}}``); a reference that is exactly one placeholder
    naming a list gives a QA item several acceptable answers."""
    predictions = [render(prediction, ns).strip() for ns in namespaces]
    if task == "classification":
        return classification_report([render(reference, ns).strip() for ns in namespaces], predictions)
    return qa_report([_answers(reference, ns) for ns in namespaces], predictions)


def _answers(reference: str, namespaces: dict[str, Any]) -> list[str]:
    paths = references(reference, param="reference")
    if len(paths) == 1 and _whole(reference):
        value = lookup(paths[0], namespaces)
        if isinstance(value, list):
            return [as_text(v) for v in value]
    return [render(reference, namespaces)]


def _whole(template: str) -> bool:
    """Whether the template is one placeholder and nothing else."""
    text = template.strip()
    return text.startswith("{{") and text.endswith("}}") and text.count("{{") == 1
