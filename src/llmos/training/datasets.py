"""Training data formats, detected and validated at upload; every error names its line and field.

| format | file | a record |
|---|---|---|
| chat | JSONL | `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}` with an assistant turn |
| classification | JSONL or CSV/TSV with a header | `{"text": "...", "label": "..."}` / columns `text` (or
  `sentence`) and `label` (or `category`); a file of pairs (a cross-encoder's: query and passage, read
  together) adds `text_pair` to every line or a `text_pair` column |
| token-classification | JSONL or CoNLL | `{"tokens": [...], "tags": [...]}` of equal length /
  `token<TAB>tag` lines, a blank line between sentences |
| preference | JSONL | OpenAI's DPO line: `{"input": {"messages": [...]}, "preferred_output": [{"role":
  "assistant", "content": "..."}], "non_preferred_output": [...]}` |
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmos.errors import InvalidRequestError
from llmos.registry.formats import json_depth_exceeds

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant"})
# Column names accepted for tables, in order of preference (SST-2 says "sentence", Banking77 "category").
TEXT_COLUMNS = frozenset({"text", "sentence"})
LABEL_COLUMNS = frozenset({"label", "category"})
MAX_ERRORS_SHOWN = 5
MAX_LINE_BYTES = 16 * 1024 * 1024
"""Longest line of a training or batch file: files are read a line at a time, so this bounds the
memory a check needs whatever the file's size."""


class DatasetError(InvalidRequestError):
    """The file is not a valid training set; ``line`` is 1-based."""

    default_code = "invalid_training_file"

    def __init__(self, message: str, *, line: int | None = None, field: str | None = None) -> None:
        where = f"line {line}" if line is not None else "file"
        super().__init__(f"{where}: {message}" + (f" (field '{field}')" if field else ""), param="file")
        self.line = line
        self.field = field


@dataclass(frozen=True)
class DatasetSummary:
    format: str  # chat | preference | classification | token-classification
    encoding: str  # jsonl | csv | tsv | conll
    records: int
    labels: dict[str, int] = field(default_factory=dict)
    """Label (or tag) counts for classification formats."""
    pairs: bool = False
    """Classification records are pairs of texts (``text_pair``)."""

    def as_dict(self) -> dict[str, Any]:
        summary = {"format": self.format, "encoding": self.encoding, "records": self.records, "labels": self.labels}
        return summary | ({"pairs": True} if self.pairs else {})


def validate_dataset(path: Path) -> DatasetSummary:
    """Detect the format of a training file and check every record of it, a line at a time."""
    first = next((ln for ln in iter_lines(path) if ln.strip()), None)
    if first is None:
        raise DatasetError("the file is empty")
    if first.lstrip().startswith(("{", "[")):
        return _validate_jsonl(iter_lines(path))
    header = _header_fields(first)
    if header & TEXT_COLUMNS and header & LABEL_COLUMNS:
        return _validate_table(iter_lines(path), "\t" if "\t" in first else ",")
    return _validate_conll(iter_lines(path))


def _header_fields(line: str) -> set[str]:
    sep = "\t" if "\t" in line else ","
    return {f.strip().strip('"').lower() for f in line.split(sep)}


MAX_RECORD_DEPTH = 32  # as deep as a request body may nest by default (setting max_json_depth)


def iter_lines(path: Path) -> Iterator[str]:
    """The file's lines, decoded as UTF-8 (a leading BOM dropped) without their line ends, read one
    at a time; a line longer than ``MAX_LINE_BYTES`` or not UTF-8 is a DatasetError."""
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise DatasetError(f"longer than {MAX_LINE_BYTES} bytes", line=number)
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise DatasetError(f"not UTF-8 text (byte {offset + exc.start})") from exc
            offset += len(raw)
            yield line.rstrip("\r\n")


def read_lines(path: Path) -> list[str]:
    return list(iter_lines(path))


def jsonl_objects(lines: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) for every non-blank line; anything else is a DatasetError."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if json_depth_exceeds(line.encode(), MAX_RECORD_DEPTH):  # json.loads would recurse out of the stack
            raise DatasetError(f"JSON nesting deeper than {MAX_RECORD_DEPTH} levels", line=number)
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"invalid JSON: {exc.msg} at column {exc.colno}", line=number) from exc
        if not isinstance(record, dict):
            raise DatasetError("each line must be a JSON object", line=number)
        yield number, record


def _validate_jsonl(lines: Iterable[str]) -> DatasetSummary:
    kind: str | None = None
    labels: Counter[str] = Counter()
    records = 0
    paired: bool | None = None
    for number, record in jsonl_objects(lines):
        record_kind = _jsonl_kind(record, number)
        if kind is None:
            kind = record_kind
        elif record_kind != kind:
            raise DatasetError(f"a {record_kind} record in a {kind} file", line=number)
        if kind == "chat":
            _check_chat(record, number)
        elif kind == "preference":
            _check_preference(record, number)
        elif kind == "classification":
            _check_text(record.get("text"), number, "text")
            paired = _check_pair(record, number, paired)
            labels[_label(record.get("label"), number)] += 1
        else:
            for tag in _check_tokens(record, number):
                labels[tag] += 1
        records += 1
    assert kind is not None
    return DatasetSummary(format=kind, encoding="jsonl", records=records, labels=dict(labels), pairs=bool(paired))


def _jsonl_kind(record: dict[str, Any], line: int) -> str:
    if "messages" in record:
        return "chat"
    if "input" in record or "preferred_output" in record:
        return "preference"
    if "text" in record or "label" in record:
        return "classification"
    if "tokens" in record or "tags" in record:
        return "token-classification"
    raise DatasetError(
        "expected 'messages' (chat), 'input' + 'preferred_output' + 'non_preferred_output' (preference), "
        "'text' + 'label' (classification) or 'tokens' + 'tags' (token classification)",
        line=line,
    )


def _check_text(value: Any, line: int, name: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise DatasetError("must be a non-empty string", line=line, field=name)


def _check_pair(record: dict[str, Any], line: int, paired: bool | None) -> bool:
    """Whether the line has a ``text_pair``: every line of a file has one, or none has."""
    has = "text_pair" in record
    if has:
        _check_text(record["text_pair"], line, "text_pair")
    if paired is not None and has != paired:
        raise DatasetError("every line of a file of pairs has a 'text_pair', or none has", line=line, field="text_pair")
    return has


def _label(value: Any, line: int) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int) or (isinstance(value, str) and not value.strip()):
        raise DatasetError("must be a non-empty string or an integer", line=line, field="label")
    return str(value)


def _check_chat(record: dict[str, Any], line: int) -> None:
    messages = _check_messages(record.get("messages"), line, "messages")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise DatasetError("needs at least one non-empty assistant message to learn from", line=line, field="messages")


def _check_preference(record: dict[str, Any], line: int) -> None:
    prompt = record.get("input")
    if not isinstance(prompt, dict):
        raise DatasetError("must be an object with 'messages'", line=line, field="input")
    _check_messages(prompt.get("messages"), line, "input.messages")
    for name in ("preferred_output", "non_preferred_output"):
        output = _check_messages(record.get(name), line, name)
        if any(m["role"] != "assistant" for m in output):
            raise DatasetError("must hold assistant messages only", line=line, field=name)


def _check_messages(messages: Any, line: int, name: str) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise DatasetError("must be a non-empty list", line=line, field=name)
    for i, message in enumerate(messages):
        where = f"{name}[{i}]"
        if not isinstance(message, dict):
            raise DatasetError("must be an object", line=line, field=where)
        if message.get("role") not in CHAT_ROLES:
            raise DatasetError(f"role must be one of {sorted(CHAT_ROLES)}", line=line, field=f"{where}.role")
        if not isinstance(message.get("content"), str):
            raise DatasetError("must be a string", line=line, field=f"{where}.content")
    return messages


def _check_tokens(record: dict[str, Any], line: int) -> list[str]:
    tokens, tags = record.get("tokens"), record.get("tags")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise DatasetError("must be a non-empty list of non-empty strings", line=line, field="tokens")
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise DatasetError("must be a list of non-empty strings", line=line, field="tags")
    if len(tags) != len(tokens):
        raise DatasetError(f"{len(tags)} tags for {len(tokens)} tokens", line=line, field="tags")
    return tags


def _validate_table(lines: Iterable[str], sep: str) -> DatasetSummary:
    reader = csv.DictReader((line + "\n" for line in lines), delimiter=sep)
    fields = {(f or "").strip().lower(): f for f in reader.fieldnames or []}
    text_column = next(fields[c] for c in ("text", "sentence") if c in fields)
    label_column = next(fields[c] for c in ("label", "category") if c in fields)
    pair_column = fields.get("text_pair")
    labels: Counter[str] = Counter()
    records = 0
    for row in reader:
        number = reader.line_num
        _check_text(row.get(text_column), number, "text")
        if pair_column is not None:
            _check_text(row.get(pair_column), number, "text_pair")
        labels[_label(row.get(label_column), number)] += 1
        records += 1
    if records == 0:
        raise DatasetError("the table has a header but no rows")
    encoding = "tsv" if sep == "\t" else "csv"
    return DatasetSummary(
        format="classification", encoding=encoding, records=records, labels=dict(labels), pairs=pair_column is not None
    )


def conll_sentences(lines: Iterable[str]) -> Iterator[tuple[int, list[str], list[str]]]:
    """(1-based line of its first token, tokens, tags) for every sentence of a CoNLL file: one
    ``token<TAB>tag`` (or space-separated, tag last) line per token, a blank line between sentences."""
    start, tokens, tags = 0, list[str](), list[str]()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            if tokens:
                yield start, tokens, tags
            start, tokens, tags = 0, [], []
            continue
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) < 2 or not parts[0].strip() or not parts[-1].strip():
            raise DatasetError("expected 'token<TAB>tag' (CoNLL) or a JSONL / CSV training file", line=number)
        start = start or number
        tokens.append(parts[0].strip())
        tags.append(parts[-1].strip())
    if tokens:
        yield start, tokens, tags


def _validate_conll(lines: Iterable[str]) -> DatasetSummary:
    labels: Counter[str] = Counter()
    sentences = 0
    for _, _, tags in conll_sentences(lines):
        labels.update(tags)
        sentences += 1
    return DatasetSummary(format="token-classification", encoding="conll", records=sentences, labels=dict(labels))


def check_training_file(path: Path) -> dict[str, Any]:
    """The validator for ``purpose=fine-tune`` uploads."""
    return validate_dataset(path).as_dict()
