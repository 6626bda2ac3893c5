"""Model aliases (scope `models`): set or move ``name@alias`` to a version, split its traffic with
canary versions, roll it back, list, inspect, delete; every change audited. Resolution is the
registry's (``ModelRegistry._resolve``; a request's canary pick ``ModelAliases.route``), so an alias
works wherever a model is named."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from llmos.api.deps import PlatformDep, SettingsDep
from llmos.api.model_management.router import ModelsKey
from llmos.api.openai.chat.stored import json_object
from llmos.api.promotion import paired_scores, parse_comparison
from llmos.errors import InvalidRequestError, ModelNotFoundError, PermissionDeniedError
from llmos.platform import Platform
from llmos.registry import promotion
from llmos.registry.aliases import Alias, HistoryEntry
from llmos.registry.canary import check_weight
from llmos.registry.records import SHARED_OWNER, ModelRecord
from llmos.security import ApiKeyInfo

router = APIRouter(prefix="/v1/model_aliases", tags=["models"])

MAX_CANARIES = 8
"""Versions beside the target one alias may split its requests across."""


def is_admin(key: ApiKeyInfo) -> bool:
    return "admin" in key.scopes


def split_ref(ref: str) -> tuple[str, str]:
    name, _, alias = ref.partition("@")
    if not alias:
        raise InvalidRequestError("name the alias as name@alias", param="alias")
    return name, alias


def _version(platform: Platform, model_id: str) -> dict[str, Any]:
    record = platform.registry.get(model_id)
    return {"id": record.id, "root": f"{record.name}@{record.version}", "task": record.task}


def public(platform: Platform, alias: Alias, history: tuple[HistoryEntry, ...] | None = None) -> dict[str, Any]:
    """The alias object: its target and the share of requests it takes, its canaries, and (for one
    alias asked for) its history of targets, newest first."""
    shown: dict[str, Any] = {
        "id": alias.ref,
        "object": "model.alias",
        "model": alias.name,
        "alias": alias.alias,
        "target": {**_version(platform, alias.model_id), "weight": alias.target_weight},
        "canaries": [{"target": _version(platform, c.model_id), "weight": c.weight} for c in alias.canaries],
        "owned_by": alias.owner,
        "updated_at": int(alias.updated_at.timestamp()),
    }
    if history is not None:
        shown["history"] = [
            {
                "target": _version(platform, h.model_id),
                "set_at": int(h.set_at.timestamp()),
                "rolled_back": h.rolled_back,
            }
            for h in history
        ]
    return shown


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{name} is required and must be a string", param=name)
    return value


def find_model(platform: Platform, key: ApiKeyInfo, ref: str, *, param: str) -> ModelRecord:
    """A model the caller may see, named by ``ref``; 404 naming ``param`` otherwise."""
    try:
        return platform.registry.get(ref, tenant=None if is_admin(key) else key.tenant)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(exc.message, param=param) from exc


def _weights(alias: Alias) -> dict[str, float]:
    return {c.model_id: c.weight for c in alias.canaries}


def audit(
    platform: Platform,
    request: Request,
    key: ApiKeyInfo,
    action: str,
    ref: str,
    detail: dict[str, Any],
    *,
    outcome: str = "success",
) -> None:
    platform.audit.record(
        action,
        outcome=outcome,
        tenant=key.tenant,
        key_id=key.id,
        target=ref,
        client=request.client.host if request.client else None,
        detail=detail,
    )


def moved_detail(before: Alias | None, after: Alias) -> dict[str, Any]:
    """What an audit row says of a move: the target before and after, and a canary it ended."""
    detail: dict[str, Any] = {"from": before.model_id if before else None, "to": after.model_id}
    if before is not None and before.canaries:
        detail["canaries_ended"] = _weights(before)
    return detail


@router.get("")
async def list_aliases(
    platform: PlatformDep, key: ModelsKey, model: Annotated[str | None, Query(max_length=256)] = None
) -> dict[str, Any]:
    """The aliases the caller may see (its tenant's and shared lines'; an admin: all)."""
    found = await asyncio.to_thread(platform.registry.aliases.list, name=model)
    shown = [a for a in found if is_admin(key) or a.owner in (key.tenant, SHARED_OWNER)]
    data = await asyncio.to_thread(lambda: [public(platform, a) for a in shown])
    return {"object": "list", "data": data}


@router.get("/{ref}")
async def get_alias(ref: str, platform: PlatformDep, key: ModelsKey) -> dict[str, Any]:
    """One alias with its canaries and its history of targets."""
    name, alias = split_ref(ref)

    def read() -> dict[str, Any]:
        found = platform.registry.aliases.get(name, alias)
        if found is None or not (is_admin(key) or found.owner in (key.tenant, SHARED_OWNER)):
            raise ModelNotFoundError(f"The model '{ref[:256]}' does not exist", param="model")
        return public(platform, found, platform.registry.aliases.history(name, alias))

    return await asyncio.to_thread(read)


@router.post("")
async def set_alias(request: Request, platform: PlatformDep, settings: SettingsDep, key: ModelsKey) -> dict[str, Any]:
    """``{"model": name, "alias": "production", "target": a model reference}``: create or move (a
    move ends any canary). A gated alias (``promotion_gated_aliases``) moves only by ``promote``."""
    body = await json_object(request, {"model", "alias", "target"})
    name, alias, ref = _text(body, "model"), _text(body, "alias"), _text(body, "target")
    target = await asyncio.to_thread(find_model, platform, key, ref, param="target")
    moved, before = await asyncio.to_thread(
        platform.registry.aliases.set,
        name,
        alias,
        target,
        tenant=key.tenant,
        admin=is_admin(key),
        gated=alias in settings.promotion_gated_aliases,
    )
    audit(platform, request, key, "model.alias.set", moved.ref, moved_detail(before, moved))
    return await asyncio.to_thread(public, platform, moved)


@router.post("/{ref}/canary")
async def set_canary(ref: str, request: Request, platform: PlatformDep, key: ModelsKey) -> dict[str, Any]:
    """``{"canaries": [{"target": a model reference, "weight": percent}, ...]}``: the versions that
    take a share of the alias's requests, each end user sticking to one; replaces any before (an
    empty list ends the canary)."""
    name, alias = split_ref(ref)
    body = await json_object(request, {"canaries"})
    listed = body.get("canaries")
    if not isinstance(listed, list):
        raise InvalidRequestError("canaries is required: a list of {target, weight}", param="canaries")
    if len(listed) > MAX_CANARIES:
        raise InvalidRequestError(f"at most {MAX_CANARIES} canaries per alias", param="canaries")
    wanted: list[tuple[str, float]] = []
    for i, item in enumerate(listed):
        if not isinstance(item, dict):
            raise InvalidRequestError("each canary is an object {target, weight}", param=f"canaries[{i}]")
        unknown = sorted(set(item) - {"target", "weight"})
        if unknown:
            raise InvalidRequestError(f"unknown field '{unknown[0]}'", param=f"canaries[{i}].{unknown[0]}")
        target = item.get("target")
        if not isinstance(target, str) or not target:
            raise InvalidRequestError("target is required: a model reference", param=f"canaries[{i}].target")
        wanted.append((target, check_weight(item.get("weight"), param=f"canaries[{i}].weight")))

    def change() -> tuple[Alias, Alias]:
        records = [(find_model(platform, key, t, param=f"canaries[{i}].target"), w) for i, (t, w) in enumerate(wanted)]
        return platform.registry.aliases.set_canaries(name, alias, records, tenant=key.tenant, admin=is_admin(key))

    after, before = await asyncio.to_thread(change)
    audit(platform, request, key, "model.alias.canary", after.ref, {"from": _weights(before), "to": _weights(after)})
    return await asyncio.to_thread(public, platform, after)


@router.post("/{ref}/rollback")
async def rollback_alias(ref: str, request: Request, platform: PlatformDep, key: ModelsKey) -> dict[str, Any]:
    """Undo the alias's last change of traffic: end its canary if one runs, else move it back to
    the target it had before (409 ``no_rollback_target`` when it had none)."""
    name, alias = split_ref(ref)
    if await request.body():
        await json_object(request, set())  # it takes no fields: any sent is refused, naming it
    after, before = await asyncio.to_thread(
        platform.registry.aliases.rollback, name, alias, tenant=key.tenant, admin=is_admin(key)
    )
    audit(platform, request, key, "model.alias.rollback", after.ref, moved_detail(before, after))
    return await asyncio.to_thread(public, platform, after)


@router.post("/{ref}/promote")
async def promote(
    ref: str, request: Request, platform: PlatformDep, settings: SettingsDep, key: ModelsKey
) -> dict[str, Any]:
    """``{"target": a candidate, "eval": {"eval_id", "candidate_run", "baseline_run", "criterion"?},
    "override": false}``: move the alias to the candidate only if the eval shows it better than the
    alias's current model by ``promotion_margin`` with a paired bootstrap interval above zero (else 409
    ``promotion_not_better``; an admin's ``override`` promotes anyway). The decision goes into the
    candidate's lineage (``extra.promotions``) and the audit log, refusals included."""
    name, alias = split_ref(ref)
    body = await json_object(request, {"target", "eval", "override"})
    candidate_ref = _text(body, "target")
    comparison = parse_comparison(body.get("eval"))
    override = body.get("override", False)
    if not isinstance(override, bool):
        raise InvalidRequestError("override must be a boolean", param="override")
    if override and not is_admin(key):
        raise PermissionDeniedError("only an admin may override an eval-gated promotion", param="override")

    def compare() -> tuple[ModelRecord, promotion.Decision]:
        current = platform.registry.aliases.owned(name, alias, tenant=key.tenant, admin=is_admin(key))
        candidate = find_model(platform, key, candidate_ref, param="target")
        if candidate.id == current.model_id:
            raise InvalidRequestError(f"{current.ref} already points to {candidate_ref}", param="target")
        scores = paired_scores(platform, key.tenant, comparison, candidate_id=candidate.id, current=current)
        decision = promotion.decide(
            current.ref,
            candidate.id,
            current.model_id,
            scores.candidate,
            scores.baseline,
            margin=settings.promotion_margin,
            source=scores.source,
        )
        return candidate, decision

    candidate, decision = await asyncio.to_thread(compare)
    if not decision.better and not override:
        audit(platform, request, key, "model.alias.promote", ref, {"decision": decision.public()}, outcome="denied")
        raise promotion.refusal(decision)
    decision = replace(decision, overridden=not decision.better)
    moved, before = await asyncio.to_thread(
        platform.registry.aliases.set,
        name,
        alias,
        candidate,
        tenant=key.tenant,
        admin=is_admin(key),
        expect=decision.baseline_id,
    )
    await asyncio.to_thread(promotion.record, platform.db, decision)
    audit(
        platform,
        request,
        key,
        "model.alias.promote",
        moved.ref,
        {**moved_detail(before, moved), "decision": decision.public()},
    )
    return {**await asyncio.to_thread(public, platform, moved), "promotion": decision.public()}


@router.delete("/{ref}")
async def delete_alias(ref: str, request: Request, platform: PlatformDep, key: ModelsKey) -> dict[str, Any]:
    """Delete ``name@alias`` (the version it named stays)."""
    name, alias = split_ref(ref)
    gone = await asyncio.to_thread(
        platform.registry.aliases.delete, name, alias, tenant=key.tenant, admin=is_admin(key)
    )
    audit(platform, request, key, "model.alias.delete", gone.ref, {"from": gone.model_id})
    return {"id": gone.ref, "object": "model.alias", "deleted": True}
