"""Task metrics of eval runs: the classification report and extractive QA's exact match and F1."""

from __future__ import annotations

import pytest

from llmos.evals.task_metrics import classification_report, qa_report, run_report, token_f1


def test_classification_report_per_class_and_confusion_matrix() -> None:
    references = ["pos", "pos", "pos", "neg", "neg", "neu"]
    predictions = ["pos", "pos", "neg", "neg", "pos", "pos"]
    report = classification_report(references, predictions)
    assert report["labels"] == ["neg", "neu", "pos"]
    assert report["confusion_matrix"] == [[1, 0, 1], [0, 0, 1], [1, 0, 2]]  # rows: reference
    pos = report["per_class"]["pos"]
    assert (pos["precision"], pos["recall"], pos["support"]) == (pytest.approx(2 / 4), pytest.approx(2 / 3), 3)
    assert pos["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert report["per_class"]["neu"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["accuracy"] == pytest.approx(3 / 6)
    f1s = [report["per_class"][c]["f1"] for c in ("neg", "neu", "pos")]
    assert report["macro_f1"] == pytest.approx(sum(f1s) / 3)


def test_a_predicted_label_no_item_has_is_in_the_matrix_but_not_the_macro_average() -> None:
    report = classification_report(["a", "a"], ["a", "zzz"])
    assert report["labels"] == ["a", "zzz"] and report["confusion_matrix"] == [[1, 1], [0, 0]]
    assert report["macro_recall"] == pytest.approx(0.5)


def test_qa_exact_match_and_f1_take_the_best_reference() -> None:
    assert token_f1("The Eiffel tower!", "eiffel tower") == 1.0
    assert token_f1("in Paris France", "Paris") == pytest.approx(0.5)
    report = qa_report([["Paris", "City of Paris"], ["1889"]], ["the city of Paris", "in 1890"])
    assert report["exact_match"] == pytest.approx(0.5)
    assert report["f1"] == pytest.approx((1.0 + 0.0) / 2)


def test_run_report_reads_predictions_and_references_through_templates() -> None:
    namespaces = [
        {"item": {"label": "pos", "answers": ["Paris", "paris city"]}, "sample": {"output_text": " pos\n"}},
        {"item": {"label": "neg", "answers": ["Rome"]}, "sample": {"output_text": "pos"}},
    ]
    report = run_report("classification", namespaces, "{{sample.output_text}}", "{{item.label}}")
    assert report["accuracy"] == pytest.approx(0.5) and report["labels"] == ["neg", "pos"]
    qa = run_report("extractive_qa", namespaces, "{{sample.output_text}}", "{{ item.answers }}")
    assert qa["exact_match"] == 0.0  # "pos" is neither answer
    qa = run_report(
        "extractive_qa",
        [{"item": {"a": ["x", "pos"]}, "sample": {"output_text": "pos"}}],
        "{{sample.output_text}}",
        "{{item.a}}",
    )
    assert qa["exact_match"] == 1.0
