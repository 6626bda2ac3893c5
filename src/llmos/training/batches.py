"""Batch input files (OpenAI's format): one request per line, checked at upload."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmos.errors import InvalidRequestError
from llmos.training.datasets import DatasetError, iter_lines, jsonl_objects

BATCH_URLS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
BodyCheck = Callable[[str, dict[str, Any]], None]
"""Checks a line's body against its endpoint's request schema (the API's own, injected: this
layer does not know the schemas); raises InvalidRequestError naming the field."""


def validate_batch_file(path: Path, check_body: BodyCheck | None = None) -> dict[str, Any]:
    """Check every line is ``{"custom_id", "method": "POST", "url", "body"}`` with unique ids and,
    with ``check_body``, a body its endpoint accepts; return the count and the endpoints named."""
    seen: set[str] = set()
    urls: set[str] = set()
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
        urls.add(record["url"])
        if check_body is not None:
            try:
                check_body(record["url"], record["body"])
            except InvalidRequestError as exc:
                field = f"body.{exc.param}" if exc.param else "body"
                raise DatasetError(exc.message, line=number, field=field) from exc
    if not seen:
        raise DatasetError("the file is empty")
    return {"records": len(seen), "urls": sorted(urls)}
