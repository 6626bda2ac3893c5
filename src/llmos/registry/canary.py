"""A canary: ``name@alias`` sends a share of its requests to other versions, by weight, each end user
always to the same one.

Where a request goes is a pure function of the alias, the tenant and the request's end user (the
``user`` field; without one, the tenant as a whole): a hash places them at a point of [0, 1), and the
canaries own the top of that interval, the alias's own target the rest. So the split needs no state
per user, every server computes the same answer, and one user's conversation never flips between
versions. A canary's share grows from the top down, so raising its weight keeps the users it already
had and only adds others.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

from llmos.errors import InvalidRequestError


@dataclass(frozen=True)
class Canary:
    model_id: str
    weight: float
    """Percent of the alias's requests (0 < weight < 100; all canaries together below 100)."""


def sticky_point(alias_ref: str, tenant: str, user: str | None) -> float:
    """Where this end user of ``tenant`` falls, in [0, 1), for ``alias_ref`` (each alias splits on its
    own, so a user on the canary of one alias is not on the canary of every alias)."""
    digest = hashlib.sha256(f"{alias_ref}\0{tenant}\0{user or ''}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick(target: str, canaries: Sequence[Canary], point: float) -> str:
    """The model id a request at ``point`` goes to: a canary if the point falls in its share of the
    top of [0, 1) (canaries in the order given), else the alias's ``target``."""
    edge = 1.0
    for canary in canaries:
        edge -= canary.weight / 100.0
        if point >= edge:
            return canary.model_id
    return target


def check_weight(value: object, *, param: str) -> float:
    """A canary's weight as the API receives it: a number strictly between 0 and 100 (percent)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequestError("weight must be a number of percent, above 0 and below 100", param=param)
    if not 0 < value < 100:
        raise InvalidRequestError(f"weight must be above 0 and below 100 (percent), not {value}", param=param)
    return float(value)


def check_split(canaries: Sequence[Canary], target: str) -> None:
    """Canaries that leave the alias's own target some traffic, each version once, never the target."""
    seen: set[str] = set()
    for i, canary in enumerate(canaries):
        if canary.model_id == target:
            raise InvalidRequestError(
                "a canary must be another version than the alias's own target", param=f"canaries[{i}].target"
            )
        if canary.model_id in seen:
            raise InvalidRequestError("each version may be a canary once", param=f"canaries[{i}].target")
        seen.add(canary.model_id)
    total = sum(c.weight for c in canaries)
    if total >= 100:
        raise InvalidRequestError(
            f"the canaries' weights add up to {total:g}; they must leave the alias's target some traffic "
            "(below 100): to move all traffic, set the alias's target",
            param="canaries",
        )
