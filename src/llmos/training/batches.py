"""Batch input files (OpenAI's format): one request per line, checked at upload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmos.training.datasets import DatasetError, iter_lines, jsonl_objects

BATCH_URLS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})


def validate_batch_file(path: Path) -> dict[str, Any]:
    """Check every line is ``{"custom_id", "method": "POST", "url", "body"}`` with unique ids; return the count."""
    seen: set[str] = set()
    for number, record in jsonl_objects(iter_lines(path)):
        custom_id = record.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            raise DatasetError("must be a non-empty string", line=number, field="custom_id")
        if custom_id in seen:
            raise DatasetError(f"duplicate custom_id {custom_id!r}", line=number, field="custom_id")
        seen.add(custom_id)
        if record.get("method") != "POST":
            raise DatasetError("must be POST", line=number, field="method")
        if record.get("url") not in BATCH_URLS:
            raise DatasetError(f"must be one of {sorted(BATCH_URLS)}", line=number, field="url")
        if not isinstance(record.get("body"), dict):
            raise DatasetError("must be an object", line=number, field="body")
    if not seen:
        raise DatasetError("the file is empty")
    return {"records": len(seen)}
