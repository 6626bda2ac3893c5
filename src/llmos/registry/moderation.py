"""Moderation policies, one per tenant: which classification model moderates, at which score a
category is flagged, how the model's labels map to OpenAI's categories, the tenant's blocked terms,
and whether chat completions' inputs and outputs must pass. Checked whole before it is written."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, DateTime, String
from sqlalchemy.orm import Mapped, mapped_column

from llmos.errors import InvalidRequestError
from llmos.registry.db import Database
from llmos.registry.tables import Base, utcnow

CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/intent",
    "self-harm/instructions",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)
"""OpenAI's moderation categories, as its response names them."""
MAX_LABELS = 256
MAX_TERMS = 1000
MAX_TERM_CHARS = 128
_SEPARATORS = re.compile(r"[\s/_-]+")


def _squashed(name: str) -> str:
    return _SEPARATORS.sub("", name.strip().lower())


_BY_SQUASHED = {_squashed(c): c for c in CATEGORIES}


def category_named(label: str) -> str | None:
    """The category a model's label names, whatever its case and separators (``self_harm_intent``
    is ``self-harm/intent``); None for a label naming none (``safe``, ``neutral``)."""
    return _BY_SQUASHED.get(_squashed(label))


class ModerationPolicyRow(Base):
    __tablename__ = "moderation_policies"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


@dataclass(frozen=True)
class ModerationPolicy:
    model: str | None = None
    threshold: float | None = None
    check_input: bool = False
    check_output: bool = False
    label_map: dict[str, str] = field(default_factory=dict)
    """A model's label -> the category it stands for (labels named after a category need none)."""
    blocked_terms: dict[str, list[str]] = field(default_factory=dict)
    """Category -> words or phrases that flag it wherever they stand as whole words."""

    def public(self, tenant: str) -> dict[str, Any]:
        return {"object": "moderation_policy", "tenant": tenant, **self.as_dict()}

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "threshold": self.threshold,
            "check_input": self.check_input,
            "check_output": self.check_output,
            "label_map": dict(self.label_map),
            "blocked_terms": {k: list(v) for k, v in self.blocked_terms.items()},
        }

    def category_of(self, label: str) -> str | None:
        return self.label_map.get(label) or category_named(label)

    def term_pattern(self, category: str) -> re.Pattern[str] | None:
        """One case-insensitive pattern of the category's terms, each matched as whole words."""
        terms = self.blocked_terms.get(category)
        if not terms:
            return None
        alternatives = "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True))
        return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


def _category(value: Any, param: str) -> str:
    if not isinstance(value, str) or value not in CATEGORIES:
        raise InvalidRequestError(f"{param}: {str(value)[:64]!r} is not one of {', '.join(CATEGORIES)}", param=param)
    return value


def check_policy(
    *,
    model: str | None,
    threshold: float | None,
    check_input: bool,
    check_output: bool,
    label_map: dict[str, str] | None,
    blocked_terms: dict[str, list[str]] | None,
) -> ModerationPolicy:
    """The policy, or 400 naming the first field that is wrong."""
    if threshold is not None and not 0.0 < threshold <= 1.0:
        raise InvalidRequestError("threshold must be above 0 and at most 1", param="threshold")
    labels = label_map or {}
    if len(labels) > MAX_LABELS or any(not isinstance(k, str) or not 0 < len(k) <= 128 for k in labels):
        raise InvalidRequestError(
            f"label_map holds at most {MAX_LABELS} labels of 1 to 128 characters", param="label_map"
        )
    mapped = {label: _category(category, "label_map") for label, category in labels.items()}
    terms: dict[str, list[str]] = {}
    for category, words in (blocked_terms or {}).items():
        _category(category, "blocked_terms")
        if not isinstance(words, list) or any(
            not isinstance(w, str) or not w.strip() or len(w) > MAX_TERM_CHARS for w in words
        ):
            raise InvalidRequestError(
                f"blocked_terms.{category} must be a list of non-blank terms of at most {MAX_TERM_CHARS} characters",
                param="blocked_terms",
            )
        terms[category] = sorted({w.strip() for w in words})
    if sum(len(w) for w in terms.values()) > MAX_TERMS:
        raise InvalidRequestError(f"blocked_terms holds at most {MAX_TERMS} terms in all", param="blocked_terms")
    return ModerationPolicy(model, threshold, check_input, check_output, mapped, {k: v for k, v in terms.items() if v})


class ModerationPolicies:
    """The tenants' policies in the database; a tenant without one moderates nothing it is not asked to."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, tenant: str) -> ModerationPolicy | None:
        with self.db.session() as s:
            row = s.get(ModerationPolicyRow, tenant)
            return None if row is None else ModerationPolicy(**row.policy)

    def put(self, tenant: str, policy: ModerationPolicy) -> None:
        with self.db.session() as s:
            row = s.get(ModerationPolicyRow, tenant)
            if row is None:
                s.add(ModerationPolicyRow(tenant=tenant, policy=policy.as_dict()))
            else:
                row.policy = policy.as_dict()

    def delete(self, tenant: str) -> bool:
        with self.db.session() as s:
            row = s.get(ModerationPolicyRow, tenant)
            if row is None:
                return False
            s.delete(row)
            return True
