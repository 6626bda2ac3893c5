"""Metrics of generated text against references: ROUGE (rouge-score's F-measure, the one
implementation both the ``text_similarity`` grader and the ``summarization`` task metric use) and
corpus BLEU and chrF (sacrebleu, reported with sacrebleu's signature so a score can be reproduced).

Corpus BLEU is not the mean of sentence BLEU (the n-gram counts are summed over the corpus before
the precisions are taken), so the ``translation`` report is sacrebleu's corpus score, while the
``bleu`` grader stays sentence-level: it scores one item.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

ROUGE_NAMES = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_3": "rouge3", "rouge_4": "rouge4", "rouge_5": "rouge5"}
ROUGE_NAMES["rouge_l"] = "rougeL"
SUMMARY_ROUGE = ("rouge_1", "rouge_2", "rouge_l")
"""The ROUGE variants a summarization report gives (those summarization papers report)."""


def rouge(prediction: str, references: Sequence[str], metrics: Sequence[str]) -> dict[str, float]:
    """Each of ``metrics`` (``rouge_1`` .. ``rouge_5``, ``rouge_l``): the F-measure of ``prediction``
    against the best of ``references``."""
    from rouge_score.rouge_scorer import RougeScorer

    names = [ROUGE_NAMES[m] for m in metrics]
    scores = RougeScorer(names).score_multi(list(references), prediction)
    return {metric: float(scores[name].fmeasure) for metric, name in zip(metrics, names, strict=True)}


def summarization_report(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, Any]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F-measures, each item against its best reference, averaged."""
    totals = dict.fromkeys(SUMMARY_ROUGE, 0.0)
    for refs, prediction in zip(references, predictions, strict=True):
        for metric, value in rouge(prediction, refs, SUMMARY_ROUGE).items():
            totals[metric] += value
    n = len(predictions)
    return {"task": "summarization", "items": n, **{m: (v / n if n else 0.0) for m, v in totals.items()}}


def translation_report(references: Sequence[Sequence[str]], predictions: Sequence[str]) -> dict[str, Any]:
    """sacrebleu's corpus BLEU and chrF (scores 0-100, as sacrebleu and papers give them) with their
    signatures. Items may have different numbers of references."""
    from sacrebleu.metrics import BLEU, CHRF

    streams = max((len(refs) for refs in references), default=1)
    # sacrebleu takes one stream per reference position; an item with fewer references has None there.
    reference_streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(streams)]
    report: dict[str, Any] = {"task": "translation", "items": len(predictions)}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        if not predictions:  # sacrebleu scores no empty corpus, and signs only what it scored
            report[name], report[f"{name}_signature"] = 0.0, None
            continue
        report[name] = float(metric.corpus_score(list(predictions), reference_streams).score)  # type: ignore[arg-type]
        report[f"{name}_signature"] = str(metric.get_signature())
    return report
