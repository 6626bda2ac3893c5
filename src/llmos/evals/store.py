"""Evals as stored: created whole once checked, listed, renamed, deleted (with their runs), per tenant."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, select

from llmos.errors import InvalidRequestError, NotFoundError
from llmos.evals.criteria import (
    Grader,
    LabelModel,
    ScoreModel,
    from_public,
    parse_criteria,
    public,
    template_paths,
)
from llmos.evals.data import DataSourceConfig, config_from_stored, parse_config
from llmos.registry.completions import as_utc
from llmos.registry.db import Database
from llmos.registry.eval_tables import EvalRow
from llmos.registry.metadata import check_metadata

MAX_NAME = 512


@dataclass(frozen=True)
class Eval:
    id: str
    tenant: str
    name: str
    config: DataSourceConfig
    graders: list[Grader]
    metadata: dict[str, str] | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: EvalRow) -> Eval:
        return cls(
            id=row.id,
            tenant=row.tenant,
            name=row.name,
            config=config_from_stored(row.data_source_config),
            graders=from_public(row.testing_criteria),
            metadata=row.eval_metadata,
            created_at=as_utc(row.created_at),
        )

    @property
    def reads_sample(self) -> bool:
        """Whether a grader's template names ``sample`` (so each item needs one)."""
        return any(path[0] == "sample" for g in self.graders for path in template_paths(g))

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "eval",
            "name": self.name,
            "created_at": int(self.created_at.timestamp()),
            "data_source_config": self.config.public(),
            "testing_criteria": [public(g) for g in self.graders],
            "metadata": self.metadata,
        }


def _name(value: Any, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > MAX_NAME:
        raise InvalidRequestError(f"name must be a string of at most {MAX_NAME} characters", param="name")
    return value


def not_found(eval_id: str) -> NotFoundError:
    return NotFoundError(f"No eval found with id '{eval_id[:80]}'", param="eval_id")


class EvalStore:
    def __init__(self, db: Database, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.db = db
        self.clock = clock

    def create(self, tenant: str, body: dict[str, Any], check_model: Callable[[str, str], None]) -> Eval:
        """Check the whole request (data source config, every grader and its templates, metadata,
        each grader's model by ``check_model(model, param)``), then store it; nothing is stored on error."""
        config = parse_config(body.get("data_source_config"))
        graders = parse_criteria(body.get("testing_criteria"), config.item_names)
        metadata = check_metadata(body.get("metadata"))
        for i, grader in enumerate(graders):
            if isinstance(grader, LabelModel | ScoreModel):
                check_model(grader.model, f"testing_criteria[{i}].model")
        eval_id = f"eval_{uuid.uuid4().hex}"
        now = self.clock()
        row = EvalRow(
            id=eval_id,
            tenant=tenant,
            name=_name(body.get("name"), eval_id),
            data_source_config=config.stored(),
            testing_criteria=[public(g) for g in graders],
            eval_metadata=metadata,
            created_at=now,
            updated_at=now,
        )
        with self.db.session() as s:
            s.add(row)
            s.flush()
            return Eval.from_row(row)

    def get(self, tenant: str, eval_id: str) -> Eval:
        """A tenant's eval; another tenant's does not exist for it (404)."""
        with self.db.session() as s:
            row = s.get(EvalRow, eval_id[:64])
            if row is None or row.tenant != tenant:
                raise not_found(eval_id)
            return Eval.from_row(row)

    def page(self, tenant: str, *, after: str | None, limit: int, order: str, order_by: str) -> tuple[list[Eval], bool]:
        """A page of a tenant's evals by ``created_at`` or ``updated_at``; ``after`` an eval id."""
        column = EvalRow.updated_at if order_by == "updated_at" else EvalRow.created_at
        with self.db.session() as s:
            q = select(EvalRow).where(EvalRow.tenant == tenant)
            if after is not None:
                cursor = s.get(EvalRow, after[:64])
                if cursor is None or cursor.tenant != tenant:
                    raise InvalidRequestError(f"No eval found with id '{after[:80]}'", param="after")
                at = getattr(cursor, column.key)
                beyond = (column < at) | ((column == at) & (EvalRow.id < cursor.id))
                if order == "asc":
                    beyond = (column > at) | ((column == at) & (EvalRow.id > cursor.id))
                q = q.where(or_(beyond))
            ordering = (column.asc(), EvalRow.id.asc()) if order == "asc" else (column.desc(), EvalRow.id.desc())
            rows = list(s.scalars(q.order_by(*ordering).limit(limit + 1)))
            return [Eval.from_row(r) for r in rows[:limit]], len(rows) > limit

    def update(self, tenant: str, eval_id: str, body: dict[str, Any]) -> Eval:
        """Rename an eval or replace its metadata (the two changes OpenAI allows)."""
        self.get(tenant, eval_id)
        name = _name(body.get("name"), "") if "name" in body else None
        metadata = check_metadata(body.get("metadata")) if "metadata" in body else None
        with self.db.session() as s:
            row = s.get(EvalRow, eval_id)
            if row is None or row.tenant != tenant:  # deleted meanwhile
                raise not_found(eval_id)
            if name is not None:
                row.name = name
            if "metadata" in body:
                row.eval_metadata = metadata
            row.updated_at = self.clock()
        return self.get(tenant, eval_id)

    def delete(self, tenant: str, eval_id: str) -> None:
        """Delete an eval with its runs and their output items."""
        with self.db.session() as s:
            row = s.get(EvalRow, eval_id[:64])
            if row is None or row.tenant != tenant:
                raise not_found(eval_id)
            s.delete(row)
