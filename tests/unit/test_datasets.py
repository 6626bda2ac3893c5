from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmos.training.datasets import DatasetError, validate_dataset

SHARED = Path(__file__).resolve().parents[3] / "shared" / "datasets"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_chat_jsonl(tmp_path: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    summary = validate_dataset(write(tmp_path, "c.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert (summary.format, summary.encoding, summary.records) == ("chat", "jsonl", 3)


def test_openai_dpo_lines_are_preference_data(tmp_path: Path) -> None:
    row = {
        "input": {"messages": [{"role": "user", "content": "hi"}]},
        "preferred_output": [{"role": "assistant", "content": "hello"}],
        "non_preferred_output": [{"role": "assistant", "content": "go away"}],
    }
    summary = validate_dataset(write(tmp_path, "p.jsonl", "\n".join(json.dumps(row) for _ in range(2))))
    assert (summary.format, summary.records) == ("preference", 2)
    for broken, field in (
        ({**row, "input": "hi"}, "input"),
        ({**row, "non_preferred_output": []}, "non_preferred_output"),
        ({**row, "preferred_output": [{"role": "user", "content": "x"}]}, "preferred_output"),
        ({**row, "input": {"messages": [{"role": "user", "content": 1}]}}, "input.messages[0].content"),
    ):
        with pytest.raises(DatasetError) as exc:
            validate_dataset(write(tmp_path, "bad.jsonl", json.dumps(row) + "\n" + json.dumps(broken)))
        assert (exc.value.line, exc.value.field) == (2, field)


def test_real_datasets_are_recognised(tmp_path: Path) -> None:
    sst2 = validate_dataset(SHARED / "sst2" / "dev.tsv")
    assert sst2.format == "classification" and sst2.encoding == "tsv" and sst2.records == 872
    assert set(sst2.labels) == {"0", "1"}
    banking = validate_dataset(SHARED / "banking77" / "test.csv")
    assert banking.format == "classification" and banking.records == 3080 and len(banking.labels) == 77
    wnut = validate_dataset(SHARED / "wnut17" / "dev.conll")
    assert wnut.format == "token-classification" and wnut.records == 1009
    assert "B-location" in wnut.labels
    instruct = validate_dataset(SHARED / "sft_self_instruct" / "train.jsonl")
    assert instruct.format == "chat" and instruct.records == 175


def test_pairs_of_texts_are_classification_data(tmp_path: Path) -> None:
    rows = [{"text": "capital of France?", "text_pair": "Paris is the capital.", "label": 1}] * 2
    summary = validate_dataset(write(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows)))
    assert (summary.format, summary.pairs, summary.as_dict()["pairs"]) == ("classification", True, True)
    table = validate_dataset(write(tmp_path, "p.tsv", "text\ttext_pair\tlabel\nq\tpassage\t1\n"))
    assert table.pairs and table.encoding == "tsv"
    assert "pairs" not in validate_dataset(write(tmp_path, "t.tsv", "text\tlabel\nq\t1\n")).as_dict()


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ('{"text": "q", "text_pair": "p", "label": 1}\n{"text": "q", "label": 0}', 2, "text_pair"),
        ('{"text": "q", "label": 1}\n{"text": "q", "text_pair": "p", "label": 0}', 2, "text_pair"),
        ('{"text": "q", "text_pair": " ", "label": 1}', 1, "text_pair"),
        ("text,text_pair,label\nq,,1\n", 2, "text_pair"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', 1, "messages"),  # nothing to learn from
        (
            '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n{bad json',
            2,
            None,
        ),
        ('{"messages": [{"role": "wizard", "content": "hi"}]}', 1, "messages[0].role"),
        ('{"messages": [{"role": "user", "content": 5}]}', 1, "messages[0].content"),
        ('{"text": "good", "label": "pos"}\n{"text": "", "label": "neg"}', 2, "text"),
        ('{"text": "good", "label": null}', 1, "label"),
        ('{"tokens": ["a", "b"], "tags": ["O"]}', 1, "tags"),
        ('{"text": "a", "label": "x"}\n{"tokens": ["a"], "tags": ["O"]}', 2, None),
        ("[1, 2]", 1, None),
        ("text,label\nfine,1\n,0\n", 3, "text"),
        ("hello\tO\nworld\n", 2, None),
    ],
)
def test_errors_name_the_line_and_field(tmp_path: Path, text: str, line: int, field: str | None) -> None:
    with pytest.raises(DatasetError) as exc:
        validate_dataset(write(tmp_path, "bad.txt", text))
    assert exc.value.line == line
    assert exc.value.field == field
    assert f"line {line}" in exc.value.message


@pytest.mark.parametrize("text", ["", "\n\n  \n", "text,label\n"])
def test_empty_files_are_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(DatasetError):
        validate_dataset(write(tmp_path, "empty.jsonl", text))


def test_non_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bin.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetError, match="UTF-8"):
        validate_dataset(path)
