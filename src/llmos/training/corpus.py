"""Raw text corpora for pre-training: files of purpose ``pretrain``, checked at upload a chunk at a
time (UTF-8, not binary, not empty), and the platform's train/validation split of them when a job
names no validation file."""

from __future__ import annotations

import codecs
import random
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmos.training.datasets import DatasetError

CORPUS_PURPOSE = "pretrain"
READ_CHUNK = 1 << 20
"""Bytes read at a time: validation and loading never hold more than this of a file undecoded."""
SPLIT_BLOCK_CHARS = 4096
"""The platform's split draws validation text in blocks of this many characters (cut at a line end
where one is near), so it samples the whole corpus rather than its end alone."""
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0e-\x1f]")
"""Bytes that text does not contain (tab, newlines and form feed aside): a file with them is binary."""


def validate_corpus(path: Path) -> dict[str, Any]:
    """Upload check of a corpus file: valid UTF-8 throughout, no control bytes, some text. Returns
    its size in characters and lines; raises DatasetError (400 at job creation) naming the offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    characters, lines, offset, visible, last = 0, 0, 0, False, ""
    with path.open("rb") as f:
        while chunk := f.read(READ_CHUNK):
            bad = _CONTROL.search(chunk)
            if bad is not None:
                raise DatasetError(
                    f"byte {offset + bad.start()} is a control byte (0x{chunk[bad.start()]:02x}): the file is binary, "
                    "not text"
                )
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise DatasetError(f"byte {offset + exc.start} is not valid UTF-8: a corpus is UTF-8 text") from exc
            characters += len(text)
            lines += text.count("\n")
            visible = visible or bool(text.strip())
            last = text[-1:] or last
            offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise DatasetError("the file ends inside a UTF-8 character") from exc
    if not visible:
        raise DatasetError("the file is empty" if characters == 0 else "the file has no text, only white space")
    return {"format": "text", "characters": characters, "lines": lines + (last != "\n")}


def read_text(path: Path) -> str:
    """A corpus file's text (checked at upload; a byte-order mark dropped)."""
    return path.read_text(encoding="utf-8-sig")


def split_corpus(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Training and validation documents: every document cut into blocks of about
    ``SPLIT_BLOCK_CHARS`` characters, ``fraction`` of all blocks drawn for validation with
    ``seed`` (the same draw on every run of the job), and each run of adjacent blocks left for
    training joined back into one document. At least one block goes to each side."""
    blocks = [(d, block) for d, text in enumerate(texts) for block in _blocks(text)]
    if len(blocks) < 2:
        raise DatasetError(
            f"the corpus is too short to split for validation ({sum(map(len, texts))} characters); upload more "
            "text or give a validation_file"
        )
    count = min(len(blocks) - 1, max(1, round(fraction * len(blocks))))
    chosen = set(random.Random(seed).sample(range(len(blocks)), count))  # noqa: S311 -- a data split, not secrets
    train: list[str] = []
    valid: list[str] = []
    run: list[str] = []
    for i, (document, block) in enumerate(blocks):
        if i in chosen:
            valid.append(block)
        else:
            run.append(block)
        next_document = blocks[i + 1][0] if i + 1 < len(blocks) else None
        if run and (i in chosen or next_document != document):
            train.append("".join(run))
            run = []
    return train, valid


def _blocks(text: str) -> Iterator[str]:
    start = 0
    while start < len(text):
        end = min(len(text), start + SPLIT_BLOCK_CHARS)
        if end < len(text):
            newline = text.rfind("\n", start + SPLIT_BLOCK_CHARS // 2, end)
            end = newline + 1 if newline >= 0 else end
        yield text[start:end]
        start = end
