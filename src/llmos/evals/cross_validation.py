"""k-fold cross-validation of a classification recipe: the file split into k folds stratified by
label (seeded), one ordinary fine-tuning job per fold (trained on the other k-1 folds, validated
on its own: the job supervisor runs them within the tenant's limits, each registers its model with
lineage), and the folds' validation accuracy and macro-F1 summarised as mean and standard deviation.

The jobs are created through the jobs API (``llmos eval cross-validate`` drives it with the
official client), so nothing here trains: a fold's score is the metric its job registered in its
model's lineage (``extra.metrics``, the epoch the task kept), as a hyperparameter search's trial's
is (ADR 0024).
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_FOLDS = 20
METRICS = ("valid_accuracy", "valid_macro_f1")


def stratified_folds(labels: Sequence[str], k: int, *, seed: int) -> list[list[int]]:
    """The item indices of each of ``k`` folds: each label's items, shuffled by ``seed``, are dealt
    to the folds in turn, each label starting where the last one stopped, so every fold holds each
    label's share (within one item) and the folds' sizes differ by at most one."""
    if not 2 <= k <= MAX_FOLDS:
        raise ValueError(f"k must be 2 to {MAX_FOLDS}")
    if len(labels) < k:
        raise ValueError(f"{len(labels)} examples cannot fill {k} folds")
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_label[label].append(index)
    rng = random.Random(seed)  # noqa: S311  (a reproducible split, not a secret)
    folds: list[list[int]] = [[] for _ in range(k)]
    turn = 0
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        for index in members:
            folds[turn % k].append(index)
            turn += 1
    return [sorted(fold) for fold in folds]


def fold_files(rows: Sequence[dict[str, Any]], folds: list[list[int]], fold: int) -> tuple[bytes, bytes]:
    """(training, validation) JSONL of ``fold``: the other folds' rows, and its own."""
    held_out = set(folds[fold])

    def lines(indices: Sequence[int]) -> bytes:
        return "\n".join(json.dumps(rows[i], ensure_ascii=False) for i in indices).encode() + b"\n"

    return lines([i for i in range(len(rows)) if i not in held_out]), lines(folds[fold])


def fold_job(
    recipe: dict[str, Any], *, training_file: str, validation_file: str, fold: int, k: int, tag: str
) -> dict[str, Any]:
    """The fine-tuning job body of one fold: the recipe (a job body without files) with the fold's
    files, a suffix naming the fold and metadata tying the jobs of one cross-validation together."""
    suffix = f"{(recipe.get('suffix') or 'cv')[:24]}-f{fold}"
    metadata = {**(recipe.get("metadata") or {}), "cross_validation": tag, "fold": f"{fold}/{k}"}
    return {
        **recipe,
        "training_file": training_file,
        "validation_file": validation_file,
        "suffix": suffix,
        "metadata": metadata,
    }


@dataclass(frozen=True)
class FoldResult:
    fold: int
    job_id: str
    status: str
    model: str | None
    metrics: dict[str, float]
    """``valid_accuracy`` and ``valid_macro_f1`` of the model the job registered (empty if it failed)."""


def summarize(results: Sequence[FoldResult]) -> dict[str, Any]:
    """Per fold and, over the folds whose jobs succeeded, each metric's mean and standard deviation
    (the population's, numpy's and scikit-learn's default for fold scores)."""
    done = [r for r in results if r.status == "succeeded" and all(m in r.metrics for m in METRICS)]
    summary: dict[str, Any] = {
        "folds": [
            {"fold": r.fold, "job_id": r.job_id, "status": r.status, "model": r.model, **r.metrics} for r in results
        ],
        "succeeded": len(done),
    }
    for metric in METRICS:
        values = [r.metrics[metric] for r in done]
        mean = sum(values) / len(values) if values else None
        spread = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) if mean is not None else None
        summary[metric.removeprefix("valid_")] = {"mean": mean, "std": spread}
    return summary
