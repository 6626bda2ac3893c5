"""k-fold cross-validation of a classification recipe: folds stratified by label and seeded, one
ordinary fine-tuning job per fold through the jobs API (``llmos eval cross-validate``), the folds'
scores read from the models the jobs registered and summarised as mean and standard deviation.
The fast tests play the jobs' workers (as the search tests do); one slow test trains for real."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from llmos.cli import eval_studies
from llmos.cli.main import app as cli_app
from llmos.evals import cross_validation as cv
from llmos.kernel.jobs import fine_tuned_name
from llmos.platform import Platform
from llmos.registry.records import Lineage
from tests.conftest import ADMIN_KEY

LABELS = ["a"] * 10 + ["b"] * 5 + ["c"] * 3
ROWS = [{"text": f"example {i} of {label}", "label": label} for i, label in enumerate(LABELS)]
METHOD = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}}


def test_folds_partition_the_items_stratified_by_label_and_seeded() -> None:
    folds = cv.stratified_folds(LABELS, 3, seed=1)
    assert sorted(i for fold in folds for i in fold) == list(range(len(LABELS)))
    assert sorted(len(f) for f in folds) == [6, 6, 6]
    for label, total in Counter(LABELS).items():
        counts = [sum(LABELS[i] == label for i in fold) for fold in folds]
        assert max(counts) - min(counts) <= 1 and sum(counts) == total  # each fold holds the label's share
    assert cv.stratified_folds(LABELS, 3, seed=1) == folds
    assert cv.stratified_folds(LABELS, 3, seed=2) != folds
    for k, reason in ((1, "k must be"), (21, "k must be"), (19, "cannot fill")):
        with pytest.raises(ValueError, match=reason):
            cv.stratified_folds(LABELS, k, seed=0)


def test_fold_files_and_jobs() -> None:
    folds = cv.stratified_folds(LABELS, 2, seed=0)
    train, valid = cv.fold_files(ROWS, folds, 1)
    held_out = [json.loads(line) for line in valid.decode().splitlines()]
    trained = [json.loads(line) for line in train.decode().splitlines()]
    assert held_out == [ROWS[i] for i in folds[1]] and trained == [ROWS[i] for i in folds[0]]
    body = cv.fold_job({"model": "m", "suffix": "mine"}, training_file="f1", validation_file="f2", fold=1, k=2, tag="t")
    assert body == {
        "model": "m",
        "training_file": "f1",
        "validation_file": "f2",
        "suffix": "mine-f1",
        "metadata": {"cross_validation": "t", "fold": "1/2"},
    }


def test_summary_is_the_mean_and_standard_deviation_of_the_folds_that_succeeded() -> None:
    results = [
        cv.FoldResult(0, "j0", "succeeded", "m0", {"valid_accuracy": 0.8, "valid_macro_f1": 0.7}),
        cv.FoldResult(1, "j1", "succeeded", "m1", {"valid_accuracy": 0.9, "valid_macro_f1": 0.6}),
        cv.FoldResult(2, "j2", "succeeded", "m2", {"valid_accuracy": 0.7, "valid_macro_f1": 0.65}),
        cv.FoldResult(3, "j3", "failed", None, {}),
    ]
    summary = cv.summarize(results)
    assert summary["succeeded"] == 3 and [f["status"] for f in summary["folds"]][-1] == "failed"
    assert summary["accuracy"] == {"mean": pytest.approx(0.8), "std": pytest.approx(np.std([0.8, 0.9, 0.7]))}
    assert summary["macro_f1"]["std"] == pytest.approx(np.std([0.7, 0.6, 0.65]))
    assert cv.summarize([results[3]])["accuracy"] == {"mean": None, "std": None}


def test_cross_validate_creates_a_job_per_fold_and_reads_their_models(
    quiet_http: TestClient,
    loaded_platform: Platform,
    tiny_encoder_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = openai.OpenAI(base_url="http://testserver/v1", api_key=ADMIN_KEY, http_client=quiet_http, max_retries=0)
    monkeypatch.setattr(eval_studies, "api_client", lambda settings, key: client)
    data = tmp_path / "cls.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in ROWS))
    args = ["eval", "cross-validate", str(data), "--model", "tiny-embed", "--k", "3", "--seed", "4"]
    made = CliRunner().invoke(cli_app, [*args, "--method", json.dumps(METHOD), "--no-follow"])
    assert made.exit_code == 0, made.output
    jobs = sorted(client.fine_tuning.jobs.list(), key=lambda j: j.metadata["fold"])  # type: ignore[index]
    assert len(jobs) == 3 and len({j.metadata["cross_validation"] for j in jobs}) == 1  # type: ignore[index]
    folds = cv.stratified_folds(LABELS, 3, seed=4)
    for fold, job in enumerate(jobs):
        assert job.metadata["fold"] == f"{fold}/3" and job.seed == 4  # type: ignore[index]
        valid = client.files.content(job.validation_file).text  # type: ignore[arg-type]
        assert [json.loads(line)["text"] for line in valid.splitlines()] == [ROWS[i]["text"] for i in folds[fold]]
        train = client.files.content(job.training_file).text
        assert len(train.splitlines()) == len(ROWS) - len(folds[fold])

    # Each fold's job ends as a worker would end it: its model registered with the kept epoch's metrics.
    scores = [(0.5, 0.4), (0.75, 0.7), (1.0, 1.0)]
    for job, (accuracy, macro) in zip(jobs, scores, strict=True):
        loaded_platform.jobs.claim(job.id)
        record = loaded_platform.jobs.get(None, job.id)
        name = fine_tuned_name(record, "tiny-embed")
        metrics = {"valid_accuracy": accuracy, "valid_macro_f1": macro}
        lineage = Lineage(owner=record.tenant, extra={"job_id": job.id, "metrics": metrics})
        loaded_platform.registry.pull(f"file:{tiny_encoder_dir}", name=name, lineage=lineage)
        loaded_platform.jobs.succeed(job.id, record.attempts, fine_tuned_model=name, trained_tokens=10)
    results = [eval_studies._fold_result(client, fold, job.id, 0.01) for fold, job in enumerate(jobs)]
    summary = cv.summarize(results)
    assert [r.metrics["valid_accuracy"] for r in results] == [0.5, 0.75, 1.0]
    assert summary["accuracy"]["mean"] == pytest.approx(0.75)
    assert summary["macro_f1"]["std"] == pytest.approx(np.std([0.4, 0.7, 1.0]))

    missing = CliRunner().invoke(cli_app, ["eval", "cross-validate", str(data), "--model", "tiny-embed", "--k", "30"])
    assert missing.exit_code == 2  # more folds than examples: refused before anything is uploaded
    assert len(list(client.fine_tuning.jobs.list())) == 3


@pytest.mark.slow
def test_cross_validate_trains_k_folds_of_the_tiny_encoder(
    client: openai.OpenAI, http: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(eval_studies, "api_client", lambda settings, key: client)
    rows = [
        {"text": "hello how are you today", "label": "greeting"},
        {"text": "the capital of france is paris", "label": "fact"},
    ] * 6
    data = tmp_path / "cls.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    summary_file = tmp_path / "summary.json"
    args = ["eval", "cross-validate", str(data), "--model", "tiny-embed", "--k", "2", "--poll-s", "0.2"]
    ran = CliRunner().invoke(cli_app, [*args, "--method", json.dumps(METHOD), "--output", str(summary_file)])
    assert ran.exit_code == 0, ran.output
    summary = json.loads(summary_file.read_text())
    assert summary["k"] == 2 and summary["succeeded"] == 2
    for fold in summary["folds"]:
        assert fold["status"] == "succeeded" and 0.0 <= fold["valid_accuracy"] <= 1.0
        assert client.models.retrieve(fold["model"]).task == "sequence-classification"  # type: ignore[attr-defined]
    accuracies = [f["valid_accuracy"] for f in summary["folds"]]
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert "accuracy:" in ran.output and "±" in ran.output
