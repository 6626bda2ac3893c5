"""Chat examples to token ids with labels only on assistant turns (and their end-of-turn token)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None
    """Set for packed rows (see packing): positions restart at each conversation."""

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], max_len: int) -> Example | None:
    """Tokenise one conversation; None when truncation leaves no assistant token to learn."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    spans: list[tuple[int, int]] = []
    cursor = 0
    for message in messages:
        start = text.find(message["content"], cursor)
        if start < 0:
            continue
        end = start + len(message["content"])
        cursor = end
        if message["role"] == "assistant":
            spans.append((start, end))
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        inside = [i for i, (a, b) in enumerate(offsets) if b > start and a < end]
        if not inside:
            continue
        for i in inside:
            labels[i] = ids[i]
        after = inside[-1] + 1  # the end-of-turn token teaches the model to stop
        if after < len(ids):
            labels[after] = ids[after]
    ids, labels = ids[:max_len], labels[:max_len]
    if all(label == IGNORE for label in labels):
        return None
    return Example(ids, labels)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """OpenAI's messages as chat templates take them (a ``developer`` message is a system one)."""
    return [{"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]} for m in messages]


def load_chat_file(path: Path, tokenizer: Any, max_len: int) -> list[Example]:
    examples = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        if line.strip():
            example = encode_chat(tokenizer, template_messages(json.loads(line)["messages"]), max_len)
            if example is not None:
                examples.append(example)
    return examples
