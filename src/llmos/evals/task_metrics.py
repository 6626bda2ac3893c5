"""Task metrics of a run beyond OpenAI's pass/fail, over the predictions and references a run's
items hold: a classification report (per-class precision, recall and F1, macro and micro averages,
the confusion matrix), NER's entity-level precision, recall and F1 (seqeval, per entity type, micro
and macro), extractive QA's exact match and token F1 (SQuAD's normalisation), summarization's ROUGE
and translation's corpus BLEU and chrF (``text_metrics.py``). Perplexity needs the engine and is
``perplexity.py``'s; the bias probe's gaps are ``bias_probe.py``'s (here by the name ``bias``)."""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from llmos.errors import InvalidRequestError
from llmos.evals.bias_probe import bias_report
from llmos.evals.templates import as_text, lookup, references, render
from llmos.evals.text_metrics import summarization_report, translation_report

OUTSIDE = "O"
_PRF = ("precision", "recall", "f1")
_TAG = re.compile(r"^(?:[BIESLU]-\S+|O)$")
"""An IOB1/IOB2/IOBES tag, as seqeval reads them."""


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


def ner_report(references: Sequence[Sequence[str]], predictions: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level precision, recall and F1 (seqeval's default mode, conlleval's rules: the training
    loop's own ``entity_report``), micro over every entity and macro over the entity types, per type,
    and the share of tokens tagged right. A prediction of another length than its reference is cut
    or padded with ``O``, and a predicted tag that is no tag reads as ``O``: both are wrong answers
    of the model, counted in ``misaligned_items``, not reasons to refuse the report."""
    from llmos.training.ner import entity_report

    aligned, misaligned = [], 0
    for gold, predicted in zip(references, predictions, strict=True):
        tags = [t if _TAG.match(t) else OUTSIDE for t in predicted[: len(gold)]]
        tags += [OUTSIDE] * (len(gold) - len(tags))
        misaligned += len(predicted) != len(gold) or tags != list(predicted)
        aligned.append(tags)
    gold_lists = [list(g) for g in references]
    report: dict[str, Any] = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "per_type": {}}
    if any(gold_lists):
        report = entity_report(gold_lists, aligned)
    per_type: dict[str, dict[str, float]] = report["per_type"]
    tokens = sum(len(g) for g in gold_lists)
    right = sum(g == p for gold, tags in zip(gold_lists, aligned, strict=True) for g, p in zip(gold, tags, strict=True))
    return {
        "task": "ner",
        "items": len(references),
        "micro_precision": report["precision"],
        "micro_recall": report["recall"],
        "micro_f1": report["f1"],
        **{f"macro_{m}": _ratio(sum(t[m] for t in per_type.values()), len(per_type)) for m in _PRF},
        "per_type": per_type,
        "token_accuracy": _ratio(right, tokens),
        "misaligned_items": misaligned,
    }


Report = Callable[[Sequence[dict[str, Any]], str, str], dict[str, Any]]


def _classification(namespaces: Sequence[dict[str, Any]], prediction: str, reference: str) -> dict[str, Any]:
    predictions = [render(prediction, ns).strip() for ns in namespaces]
    return classification_report([render(reference, ns).strip() for ns in namespaces], predictions)


def _extractive_qa(namespaces: Sequence[dict[str, Any]], prediction: str, reference: str) -> dict[str, Any]:
    answers = [_answers(reference, ns) for ns in namespaces]  # none: an unanswerable item, which scores 0
    return qa_report(answers, [render(prediction, ns).strip() for ns in namespaces])


def _summarization(namespaces: Sequence[dict[str, Any]], prediction: str, reference: str) -> dict[str, Any]:
    return summarization_report(_all_answers(namespaces, reference), [render(prediction, ns) for ns in namespaces])


def _translation(namespaces: Sequence[dict[str, Any]], prediction: str, reference: str) -> dict[str, Any]:
    return translation_report(_all_answers(namespaces, reference), [render(prediction, ns) for ns in namespaces])


def _ner(namespaces: Sequence[dict[str, Any]], prediction: str, reference: str) -> dict[str, Any]:
    gold = []
    for i, ns in enumerate(namespaces):
        tags = tag_sequence(reference, ns)
        bad = next((t for t in tags if not _TAG.match(t)), None)
        if not tags or bad is not None:
            shown = f"{bad!r} is not an IOB or IOBES tag" if bad is not None else "it has no tags"
            raise InvalidRequestError(
                f"reference of item {i} is not a tag sequence ({shown}); name the item's tags, e.g. {{{{item.tags}}}}",
                param="reference",
            )
        gold.append(tags)
    return ner_report(gold, [tag_sequence(prediction, ns) for ns in namespaces])


REPORTS: dict[str, Report] = {
    "classification": _classification,
    "ner": _ner,
    "extractive_qa": _extractive_qa,
    "summarization": _summarization,
    "translation": _translation,
    "bias": bias_report,
}
TASKS = (*REPORTS, "perplexity")
"""Every task ``GET .../task_metrics`` takes: ``REPORTS`` read the graded items alone, perplexity
scores the items' text with a model (``perplexity.py``)."""


def run_report(task: str, namespaces: Sequence[dict[str, Any]], prediction: str, reference: str) -> dict[str, Any]:
    """``task``'s report over a run's graded items: ``prediction`` and ``reference`` are templates
    (``{{sample.output_text}}``, ``{{item.label}}``); a reference that is exactly one placeholder
    naming a list gives an item several acceptable answers (QA, summaries, translations) or, for
    NER, its tags (a prediction or reference that renders as a JSON list, or as words, is read as tags too)."""
    return REPORTS[task](namespaces, prediction, reference)


def _all_answers(namespaces: Sequence[dict[str, Any]], reference: str) -> list[list[str]]:
    """Each item's references; an item without one is a 400 (a text metric needs something to compare)."""
    answers = [_answers(reference, ns) for ns in namespaces]
    empty = next((i for i, refs in enumerate(answers) if not any(r.strip() for r in refs)), None)
    if empty is not None:
        raise InvalidRequestError(f"reference of item {empty} is empty; this task needs one", param="reference")
    return answers


def _answers(reference: str, namespaces: dict[str, Any]) -> list[str]:
    value = _whole_value(reference, namespaces)
    if isinstance(value, list):
        return [as_text(v) for v in value]
    return [render(reference, namespaces)]


def tag_sequence(template: str, namespaces: dict[str, Any]) -> list[str]:
    """The tags a template names: a list the placeholder names, else the rendered text as a JSON
    list of strings, else its whitespace-separated words."""
    value = _whole_value(template, namespaces)
    if isinstance(value, list):
        return [as_text(v) for v in value]
    text = render(template, namespaces).strip()
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, list):
            return [as_text(v) for v in parsed]
    return text.split()


def _whole_value(template: str, namespaces: dict[str, Any]) -> Any:
    """The value of a template that is one placeholder and nothing else; None otherwise."""
    text = template.strip()
    if not (text.startswith("{{") and text.endswith("}}") and text.count("{{") == 1):
        return None
    paths = references(template, param="reference")
    return lookup(paths[0], namespaces) if len(paths) == 1 else None
