"""Model aliases: ``name@alias`` (``production``, ``staging``, any name) stands for one model
version wherever a model is named. An alias belongs to the line ``name`` and its owner; it may
point only to a model of the same owner (or a shared one) and of the line's task.

An alias may also send a share of its requests to canary versions (``registry/canary.py``), and it
keeps the history of its targets, so a rollback undoes the last change of its traffic in one call."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from llmos.errors import ConflictError, InvalidRequestError, ModelNotFoundError, PermissionDeniedError
from llmos.registry.alias_tables import ModelAliasCanaryRow, ModelAliasHistoryRow
from llmos.registry.canary import Canary, check_split, pick, sticky_point
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


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Alias:
    name: str
    alias: str
    model_id: str
    owner: str
    updated_at: datetime
    canaries: tuple[Canary, ...] = ()
    """Versions taking a share of the requests; ``model_id`` takes the rest (100 - their weights)."""

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.alias}"

    @property
    def target_weight(self) -> float:
        return 100.0 - sum(c.weight for c in self.canaries)

    @classmethod
    def from_row(cls, row: ModelAliasRow, canaries: Sequence[Canary] = ()) -> Alias:
        return cls(row.name, row.alias, row.model_id, row.owner, _aware(row.updated_at), tuple(canaries))


@dataclass(frozen=True)
class HistoryEntry:
    model_id: str
    set_at: datetime
    rolled_back: bool


class ModelAliases:
    def __init__(self, db: Database) -> None:
        self.db = db

    def target(self, name: str, alias: str) -> str | None:
        """The model id ``name@alias`` stands for (its own target, whatever its canaries), or None."""
        with self.db.session() as s:
            row = s.get(ModelAliasRow, (name, alias))
            return row.model_id if row is not None else None

    def route(self, ref: str, *, tenant: str, user: str | None) -> str:
        """The reference a request for ``ref`` goes on with: for ``name@alias``, ``model@N`` of the
        version it sends this end user to (its target, or a canary: ``registry/canary.py``), so the
        response names the version that answered; any other reference (or an unknown alias, which
        resolution then refuses) as it is."""
        name, _, alias = ref.partition("@")
        if not is_alias(alias):
            return ref
        with self.db.session() as s:
            row = s.get(ModelAliasRow, (name, alias))
            if row is None:
                return ref
            canaries = self._canaries(s, name, alias)
            chosen = s.get(ModelRow, pick(row.model_id, canaries, sticky_point(ref, tenant, user)))
            return f"{chosen.name}@{chosen.version}" if chosen is not None else ref

    def get(self, name: str, alias: str) -> Alias | None:
        with self.db.session() as s:
            row = s.get(ModelAliasRow, (name, alias))
            return Alias.from_row(row, self._canaries(s, name, alias)) if row is not None else None

    def list(self, *, name: str | None = None, model_ids: set[str] | None = None) -> list[Alias]:
        with self.db.session() as s:
            q = select(ModelAliasRow).order_by(ModelAliasRow.name, ModelAliasRow.alias)
            if name is not None:
                q = q.where(ModelAliasRow.name == name)
            found = [Alias.from_row(r, self._canaries(s, r.name, r.alias)) for r in s.scalars(q)]
        return [a for a in found if model_ids is None or a.model_id in model_ids]

    def owned(self, name: str, alias: str, *, tenant: str, admin: bool) -> Alias:
        """``name@alias`` if the caller may change it (404 or 403 as ``delete`` answers otherwise)."""
        with self.db.session() as s:
            row = self._own(s, name, alias, tenant=tenant, admin=admin)
            return Alias.from_row(row, self._canaries(s, name, alias))

    def history(self, name: str, alias: str) -> tuple[HistoryEntry, ...]:
        """The targets ``name@alias`` was moved to, newest first (versions deleted since are gone)."""
        with self.db.session() as s:
            rows = s.scalars(
                select(ModelAliasHistoryRow)
                .where(ModelAliasHistoryRow.name == name, ModelAliasHistoryRow.alias == alias)
                .order_by(ModelAliasHistoryRow.id.desc())
            )
            return tuple(HistoryEntry(r.model_id, _aware(r.set_at), r.rolled_back) for r in rows)

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

    def set(
        self,
        name: str,
        alias: str,
        target: ModelRecord,
        *,
        tenant: str,
        admin: bool,
        expect: str | None = None,
        gated: bool = False,
    ) -> tuple[Alias, Alias | None]:
        """Point ``name@alias`` at ``target`` (a model the caller may see), ending any canary; returns
        the alias after and before (None: new). The caller must own the line (or be an admin); the
        target must be the line owner's or shared, and of the line's task. ``expect``: the model id
        the alias must still point to (a promotion decided against it), else 409 and nothing changes.
        ``gated``: an alias that, once set, moves only by promotion (400 naming ``eval``)."""
        validate_name(name)
        check_alias(alias)
        line = self.line(name)
        owner = line[0] if line is not None else (target.owner if admin else tenant)
        if not admin and owner != tenant:
            if owner == SHARED_OWNER:
                raise PermissionDeniedError(f"{name} is a shared model; only an admin may alias it", param="model")
            raise ModelNotFoundError(f"The model '{name}' does not exist", param="model")
        _check_target(name, owner, line[1] if line is not None else None, target, param="target")
        with self.db.session() as s:
            row = s.get(ModelAliasRow, (name, alias))
            before = Alias.from_row(row, self._canaries(s, name, alias)) if row is not None else None
            if gated and before is not None and before.model_id != target.id:
                raise InvalidRequestError(
                    f"{name}@{alias} moves only by an eval-gated promotion: POST /v1/model_aliases/{name}@{alias}"
                    "/promote naming the eval that compares the candidate with its current model",
                    param="eval",
                    code="promotion_needs_eval",
                )
            if expect is not None and (before is None or before.model_id != expect):
                raise ConflictError(
                    f"{name}@{alias} was moved since the comparison was made; compare against its target now",
                    param="alias",
                    code="alias_moved",
                )
            if row is None:
                row = ModelAliasRow(name=name, alias=alias, owner=owner)
                s.add(row)
            row.model_id = target.id
            row.updated_at = datetime.now(UTC)
            s.flush()
            s.execute(
                delete(ModelAliasCanaryRow).where(ModelAliasCanaryRow.name == name, ModelAliasCanaryRow.alias == alias)
            )
            if before is None or before.model_id != target.id:
                s.add(ModelAliasHistoryRow(name=name, alias=alias, model_id=target.id, set_at=row.updated_at))
            return Alias.from_row(row), before

    def set_canaries(
        self, name: str, alias: str, canaries: Sequence[tuple[ModelRecord, float]], *, tenant: str, admin: bool
    ) -> tuple[Alias, Alias]:
        """Replace the canaries of ``name@alias`` (an empty list ends its canary); each version is
        held to the rules of a target. Returns the alias after and before."""
        line = self.line(name)
        with self.db.session() as s:
            row = self._own(s, name, alias, tenant=tenant, admin=admin)
            for i, (record, _) in enumerate(canaries):
                _check_target(name, row.owner, line[1] if line else None, record, param=f"canaries[{i}].target")
            split = [Canary(record.id, weight) for record, weight in canaries]
            check_split(split, row.model_id)
            before = Alias.from_row(row, self._canaries(s, name, alias))
            s.execute(
                delete(ModelAliasCanaryRow).where(ModelAliasCanaryRow.name == name, ModelAliasCanaryRow.alias == alias)
            )
            s.add_all(ModelAliasCanaryRow(name=name, alias=alias, model_id=c.model_id, weight=c.weight) for c in split)
            row.updated_at = datetime.now(UTC)
            return Alias.from_row(row, split), before

    def rollback(self, name: str, alias: str, *, tenant: str, admin: bool) -> tuple[Alias, Alias]:
        """Undo the last change of ``name@alias``'s traffic: a running canary ends (all requests back
        to the alias's target, where they went before it began); otherwise the alias returns to the
        target it had before its current one. 409 when there is nothing to return to."""
        with self.db.session() as s:
            row = self._own(s, name, alias, tenant=tenant, admin=admin)
            before = Alias.from_row(row, self._canaries(s, name, alias))
            if before.canaries:
                s.execute(
                    delete(ModelAliasCanaryRow).where(
                        ModelAliasCanaryRow.name == name, ModelAliasCanaryRow.alias == alias
                    )
                )
            else:
                undone = s.scalars(
                    select(ModelAliasHistoryRow)
                    .where(
                        ModelAliasHistoryRow.name == name,
                        ModelAliasHistoryRow.alias == alias,
                        ModelAliasHistoryRow.rolled_back.is_(False),
                    )
                    .order_by(ModelAliasHistoryRow.id.desc())
                )
                previous = None
                for entry in undone:
                    if entry.model_id != row.model_id:
                        previous = entry
                        break
                    entry.rolled_back = True
                if previous is None:
                    raise ConflictError(
                        f"{name}@{alias} has no earlier target to roll back to",
                        param="alias",
                        code="no_rollback_target",
                    )
                row.model_id = previous.model_id
            row.updated_at = datetime.now(UTC)
            s.flush()
            return Alias.from_row(row), before

    def delete(self, name: str, alias: str, *, tenant: str, admin: bool) -> Alias:
        with self.db.session() as s:
            found = Alias.from_row(self._own(s, name, alias, tenant=tenant, admin=admin))
            gone = s.execute(
                delete(ModelAliasRow).where(ModelAliasRow.name == name, ModelAliasRow.alias == alias)
            ).rowcount  # type: ignore[attr-defined]
            if gone != 1:
                raise ConflictError(f"{name}@{alias} was deleted meanwhile", param="model")
            return found

    @staticmethod
    def _own(s: Session, name: str, alias: str, *, tenant: str, admin: bool) -> ModelAliasRow:
        """The alias row, if the caller may change it: 404 if it does not exist or is another
        tenant's (its name is not revealed), 403 if it is a shared line's and the caller no admin."""
        row = s.get(ModelAliasRow, (name, alias))
        if row is None or (not admin and row.owner not in (tenant, SHARED_OWNER)):
            raise ModelNotFoundError(f"The model '{name}@{alias}' does not exist", param="model")
        if not admin and row.owner != tenant:
            raise PermissionDeniedError(f"{name} is a shared model; only an admin may alias it", param="model")
        return row

    @staticmethod
    def _canaries(s: Session, name: str, alias: str) -> tuple[Canary, ...]:
        rows = s.scalars(
            select(ModelAliasCanaryRow)
            .where(ModelAliasCanaryRow.name == name, ModelAliasCanaryRow.alias == alias)
            .order_by(ModelAliasCanaryRow.model_id)
        )
        return tuple(Canary(r.model_id, r.weight) for r in rows)


def _check_target(name: str, owner: str, task: str | None, target: ModelRecord, *, param: str) -> None:
    """Where an alias of the line ``name`` (``owner``'s, of ``task``) may send requests."""
    if target.owner not in (owner, SHARED_OWNER):
        raise InvalidRequestError(
            f"an alias of {name} may point only to models of its owner {owner}"
            + (" (shared models)" if owner == SHARED_OWNER else " or shared ones"),
            param=param,
            code="alias_foreign_model",
        )
    if task is not None and target.task != task:
        raise InvalidRequestError(
            f"{name} is a {task} model; an alias of it cannot point to a {target.task} model",
            param=param,
            code="alias_task_mismatch",
        )
