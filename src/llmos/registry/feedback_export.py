"""Datasets from feedback: a tenant's stored completions and the feedback on them, turned into a
fine-tuning file of the files API (chat SFT or OpenAI's DPO lines), deduplicated, the file's
summary recording which completions and feedback its lines came from."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from llmos.errors import InvalidRequestError
from llmos.registry.completions import CompletionStore, StoredCompletion
from llmos.registry.feedback import Feedback, FeedbackStore
from llmos.registry.files import FileRecord, FileStore

ExportFormat = Literal["sft", "dpo"]
WELL_RATED = 0.75
"""The lowest score (thumbs up, 4 or 5 of 5) at which an uncorrected answer is taught as it is."""


@dataclass(frozen=True)
class ExportFilter:
    model: str | None = None
    metadata: dict[str, str] | None = None
    tags: list[str] | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    """Feedback given in [created_after, created_before)."""
    min_score: float = WELL_RATED

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "metadata": self.metadata,
            "tags": self.tags,
            "created_after": int(self.created_after.timestamp()) if self.created_after else None,
            "created_before": int(self.created_before.timestamp()) if self.created_before else None,
            "min_score": self.min_score,
        }


@dataclass
class _Verdict:
    """What the feedback on one choice of one completion comes to: the latest correction and the
    latest rating win, since a later judgement revises an earlier one."""

    completion: StoredCompletion
    choice_index: int
    correction: str | None = None
    score: float | None = None
    feedback_ids: list[str] = field(default_factory=list)

    def take(self, feedback: Feedback) -> None:
        self.feedback_ids.append(feedback.id)
        if feedback.correction is not None:
            self.correction = feedback.correction
        if feedback.score is not None:
            self.score = feedback.score


def _line(verdict: _Verdict, fmt: ExportFormat, min_score: float) -> dict[str, Any] | None:
    prompt = [{"role": m["role"], "content": m["content"]} for m in verdict.completion.messages]
    answer = verdict.completion.answer(verdict.choice_index) or ""
    if fmt == "dpo":
        if verdict.correction is None or verdict.correction.strip() == answer.strip():
            return None
        return {
            "input": {"messages": prompt},
            "preferred_output": [{"role": "assistant", "content": verdict.correction}],
            "non_preferred_output": [{"role": "assistant", "content": answer}],
        }
    if verdict.correction is not None:
        taught = verdict.correction
    elif verdict.score is not None and verdict.score >= min_score and answer.strip():
        taught = answer
    else:
        return None
    return {"messages": [*prompt, {"role": "assistant", "content": taught}]}


def export_feedback(
    completions: CompletionStore,
    feedback: FeedbackStore,
    files: FileStore,
    *,
    tenant: str,
    fmt: ExportFormat,
    filters: ExportFilter,
    max_bytes: int,
) -> FileRecord:
    """Write the matching lines as a new ``fine-tune`` file of ``tenant``; 400 when none match."""
    stored, _ = completions.list(tenant, model=filters.model, metadata=filters.metadata, limit=None)
    by_id = {c.id: c for c in stored}
    verdicts: dict[tuple[str, int], _Verdict] = {}
    given = feedback.list(
        tenant, tags=filters.tags, created_after=filters.created_after, created_before=filters.created_before
    )
    for item in given:
        completion = by_id.get(item.completion_id)
        if completion is None:
            continue
        key = (item.completion_id, item.choice_index)
        verdicts.setdefault(key, _Verdict(completion, item.choice_index)).take(item)
    lines: list[bytes] = []
    lineage: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for verdict in verdicts.values():
        line = _line(verdict, fmt, filters.min_score)
        if line is None:
            continue
        data = json.dumps(line, ensure_ascii=False, sort_keys=True).encode()
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:  # the same lesson from another completion: one line, both sources recorded
            source = lineage[seen[digest]]
        else:
            seen[digest] = len(lines)
            lines.append(data)
            source = {"line": len(lines), "completion_ids": [], "feedback_ids": []}
            lineage.append(source)
        source["completion_ids"].append(verdict.completion.id)
        source["feedback_ids"].extend(verdict.feedback_ids)
    if not lines:
        raise InvalidRequestError(
            f"no feedback matches these filters for a {fmt} dataset: SFT lines need a correction or a rating of at "
            f"least {filters.min_score}, DPO lines a correction that differs from the stored answer",
            param="filters",
            code="empty_export",
        )
    record, _ = files.create(
        tenant=tenant,
        purpose="fine-tune",
        filename=f"feedback-{fmt}.jsonl",
        chunks=[b"\n".join(lines) + b"\n"],
        max_bytes=max_bytes,
        lineage={"source": "feedback", "format": fmt, "filters": filters.describe(), "lines": lineage},
    )
    return record
