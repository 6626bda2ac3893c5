"""Model aliases: ``name@alias`` (``production``, ``staging``, any name) stands for one model
version wherever a model is named. An alias belongs to the line ``name`` and its owner; it may
point only to a model of the same owner (or a shared one) and of the line's task."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select

from llmos.errors import ConflictError, InvalidRequestError, ModelNotFoundError, PermissionDeniedError
from llmos.registry.db import Database
from llmos.registry.records import SHARED_OWNER, ModelRecord, validate_name
from llmos.registry.tables import ModelAliasRow, ModelRow

_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
"""Starting with a letter: ``name@3`` is a version number, never an alias."""


def is_alias(text: str) -> bool:
    return _ALIAS.fullmatch(text) is not None


def check_alias(alias: str) -> str:
    if not _ALIAS.fullmatch(alias):
        raise InvalidRequestError(
            f"invalid alias {alias[:80]!r}: a letter, then letters, digits, '_' or '-' (at most 64)", param="alias"
        )
    return alias


@dataclass(frozen=True)
class Alias:
    name: str
    alias: str
    model_id: str
    owner: str
    updated_at: datetime

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.alias}"

    @classmethod
    def from_row(cls, row: ModelAliasRow) -> Alias:
        moment = row.updated_at if row.updated_at.tzinfo else row.updated_at.replace(tzinfo=UTC)
        return cls(row.name, row.alias, row.model_id, row.owner, moment)


class ModelAliases:
    def __init__(self, db: Database) -> None:
        self.db = db

    def target(self, name: str, alias: str) -> str | None:
        """The model id ``name@alias`` stands for, or None."""
        with self.db.session() as s:
            row = s.get(ModelAliasRow, (name, alias))
            return row.model_id if row is not None else None

    def list(self, *, name: str | None = None, model_ids: set[str] | None = None) -> list[Alias]:
        with self.db.session() as s:
            q = select(ModelAliasRow).order_by(ModelAliasRow.name, ModelAliasRow.alias)
            if name is not None:
                q = q.where(ModelAliasRow.name == name)
            found = [Alias.from_row(r) for r in s.scalars(q)]
        return [a for a in found if model_ids is None or a.model_id in model_ids]

    def line(self, name: str) -> tuple[str, str] | None:
        """The owner and task of the line ``name``: its newest version's, else its aliases' target's."""
        with self.db.session() as s:
            row = s.scalars(select(ModelRow).where(ModelRow.name == name).order_by(ModelRow.version.desc())).first()
            if row is None:
                alias = s.scalars(select(ModelAliasRow).where(ModelAliasRow.name == name)).first()
                row = s.get(ModelRow, alias.model_id) if alias is not None else None
                if alias is not None and row is not None:
                    return alias.owner, row.task
            return (row.owner, row.task) if row is not None else None

    def set(self, name: str, alias: str, target: ModelRecord, *, tenant: str, admin: bool) -> tuple[Alias, str | None]:
        """Point ``name@alias`` at ``target`` (a model the caller may see); returns the alias and
        the model id it pointed to before (None: new). The caller must own the line (or be an
        admin); the target must be the line owner's or shared, and of the line's task."""
        validate_name(name)
        check_alias(alias)
        line = self.line(name)
        owner = line[0] if line is not None else (target.owner if admin else tenant)
        if not admin and owner != tenant:
            if owner == SHARED_OWNER:
                raise PermissionDeniedError(f"{name} is a shared model; only an admin may alias it", param="model")
            raise ModelNotFoundError(f"The model '{name}' does not exist", param="model")
        if target.owner not in (owner, SHARED_OWNER):
            raise InvalidRequestError(
                f"an alias of {name} may point only to models of its owner {owner}"
                + (" (shared models)" if owner == SHARED_OWNER else " or shared ones"),
                param="target",
                code="alias_foreign_model",
            )
        if line is not None and target.task != line[1]:
            raise InvalidRequestError(
                f"{name} is a {line[1]} model; an alias of it cannot point to a {target.task} model",
                param="target",
                code="alias_task_mismatch",
            )
        with self.db.session() as s:
            row = s.get(ModelAliasRow, (name, alias))
            before = row.model_id if row is not None else None
            if row is None:
                row = ModelAliasRow(name=name, alias=alias, owner=owner)
                s.add(row)
            row.model_id = target.id
            row.updated_at = datetime.now(UTC)
            s.flush()
            return Alias.from_row(row), before

    def delete(self, name: str, alias: str, *, tenant: str, admin: bool) -> Alias:
        with self.db.session() as s:
            row = s.get(ModelAliasRow, (name, alias))
            if row is None or (not admin and row.owner not in (tenant, SHARED_OWNER)):
                raise ModelNotFoundError(f"The model '{name}@{alias}' does not exist", param="model")
            if not admin and row.owner != tenant:
                raise PermissionDeniedError(f"{name} is a shared model; only an admin may alias it", param="model")
            found = Alias.from_row(row)
            gone = s.execute(
                delete(ModelAliasRow).where(ModelAliasRow.name == name, ModelAliasRow.alias == alias)
            ).rowcount  # type: ignore[attr-defined]
            if gone != 1:
                raise ConflictError(f"{name}@{alias} was deleted meanwhile", param="model")
            return found
