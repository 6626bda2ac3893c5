"""Task metrics of eval runs: the classification report, NER's entity F1 (seqeval), extractive QA's
exact match and F1, summarization's ROUGE and translation's corpus BLEU and chrF (sacrebleu)."""

from __future__ import annotations

import pytest
import sacrebleu

from llmos.errors import InvalidRequestError
from llmos.evals.graders import similarity
from llmos.evals.task_metrics import classification_report, ner_report, qa_report, run_report, token_f1


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


def test_ner_report_scores_whole_entities_per_type_micro_and_macro() -> None:
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    report = ner_report(gold, predicted)
    assert report["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert report["per_type"]["LOC"]["recall"] == 0.0 and report["per_type"]["LOC"]["precision"] == 0.0
    # 2 of 3 gold entities found, 2 of 3 predicted right (PER and ORG; the LOC is in the wrong place)
    assert report["micro_precision"] == pytest.approx(2 / 3) and report["micro_recall"] == pytest.approx(2 / 3)
    assert report["macro_f1"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)
    assert report["token_accuracy"] == pytest.approx(4 / 6) and report["misaligned_items"] == 0


def test_a_prediction_of_the_wrong_length_or_no_tags_is_wrong_not_refused() -> None:
    report = ner_report([["B-PER", "O", "B-LOC"]], [["B-PER", "banana"]])  # padded with O, "banana" read as O
    assert report["misaligned_items"] == 1
    assert report["micro_precision"] == 1.0 and report["micro_recall"] == pytest.approx(0.5)


def test_run_report_reads_ner_tags_from_lists_json_or_words() -> None:
    namespaces = [
        {"item": {"tags": ["B-PER", "O"]}, "sample": {"output_text": '["B-PER", "O"]'}},
        {"item": {"tags": ["O", "B-LOC"]}, "sample": {"output_text": "O B-LOC"}},
    ]
    report = run_report("ner", namespaces, "{{sample.output_text}}", "{{item.tags}}")
    assert report["micro_f1"] == 1.0 and report["items"] == 2
    with pytest.raises(InvalidRequestError) as err:  # a reference that is no tag sequence does not fit the task
        run_report("ner", [{"item": {"label": "positive"}, "sample": {}}], "{{sample.output_text}}", "{{item.label}}")
    assert err.value.param == "reference"


def test_translation_is_sacrebleus_corpus_bleu_and_chrf_with_their_signatures() -> None:
    namespaces = [
        {
            "item": {"refs": ["the cat is on the mat", "there is a cat on the mat"]},
            "sample": {"output_text": "the cat is on the mat"},
        },
        {"item": {"refs": ["hello world"]}, "sample": {"output_text": "hello there world"}},
    ]
    report = run_report("translation", namespaces, "{{sample.output_text}}", "{{item.refs}}")
    hypotheses = ["the cat is on the mat", "hello there world"]
    streams = [["the cat is on the mat", "hello world"], ["there is a cat on the mat", None]]
    assert report["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, streams).score)  # type: ignore[arg-type]
    assert report["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, streams).score)  # type: ignore[arg-type]
    assert 0 < report["bleu"] < 100 and report["bleu_signature"].startswith("nrefs:var|")
    assert "version:" in report["chrf_signature"]
    with pytest.raises(InvalidRequestError) as err:
        run_report(
            "translation", [{"item": {}, "sample": {"output_text": "x"}}], "{{sample.output_text}}", "{{item.refs}}"
        )
    assert err.value.param == "reference"


def test_summarization_rouge_is_the_graders_rouge_averaged_best_reference_first() -> None:
    namespaces = [
        {"item": {"summary": ["the cat sat on the mat", "a dog"]}, "sample": {"output_text": "the cat sat"}},
        {"item": {"summary": ["stocks fell sharply"]}, "sample": {"output_text": "stocks rose"}},
    ]
    report = run_report("summarization", namespaces, "{{sample.output_text}}", "{{item.summary}}")
    first = similarity("rouge_1", "the cat sat", "the cat sat on the mat")  # the grader's own ROUGE
    second = similarity("rouge_1", "stocks rose", "stocks fell sharply")
    assert report["rouge_1"] == pytest.approx((first + second) / 2)
    assert report["rouge_2"] == pytest.approx(
        (similarity("rouge_2", "the cat sat", "the cat sat on the mat") + 0.0) / 2
    )
    assert set(report) == {"task", "items", "rouge_1", "rouge_2", "rouge_l"}
