"""Moderation: a classification model's label probabilities mapped to OpenAI's categories, the
tenant's blocked terms on top, flagged at the policy's threshold. The same check serves
POST /v1/moderations and the chat completions a tenant's policy moderates."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from llmos.api.context import RequestContext
from llmos.api.openai.chat.schemas import ChatCompletionRequest
from llmos.api.openai.chat.serving import ChatService
from llmos.config import Settings
from llmos.engine.protocol import EngineClient
from llmos.errors import InvalidRequestError
from llmos.monitoring import metrics
from llmos.registry.moderation import CATEGORIES, ModerationPolicies, ModerationPolicy


@dataclass(frozen=True)
class Verdict:
    """One text's moderation: a score for every category, those at or over the threshold flagged."""

    scores: dict[str, float]
    flagged: list[str]
    covered: frozenset[str]
    """The categories something scored (a model's label or a blocked term); the rest score 0."""

    def public(self) -> dict[str, Any]:
        return {
            "flagged": bool(self.flagged),
            "categories": {c: c in self.flagged for c in CATEGORIES},
            "category_scores": {c: self.scores[c] for c in CATEGORIES},
            "category_applied_input_types": {c: ["text"] if c in self.covered else [] for c in CATEGORIES},
        }


@dataclass(frozen=True)
class Moderation:
    model: str
    verdicts: list[Verdict]
    prompt_tokens: int

    def public(self) -> dict[str, Any]:
        return {
            "id": f"modr-{uuid.uuid4().hex[:24]}",
            "model": self.model,
            "results": [v.public() for v in self.verdicts],
        }


class Moderator:
    """Moderation for one request's caller: its tenant's policy (if any) over the settings."""

    def __init__(self, engine: EngineClient, settings: Settings, ctx: RequestContext, policy: ModerationPolicy | None):
        self.engine = engine
        self.settings = settings
        self.ctx = ctx
        self.policy = policy or ModerationPolicy()

    @classmethod
    async def of(cls, engine: EngineClient, settings: Settings, ctx: RequestContext) -> Moderator:
        policy = await asyncio.to_thread(ModerationPolicies(ctx.platform.db).get, ctx.tenant)
        return cls(engine, settings, ctx, policy)

    async def moderate(self, texts: Sequence[str], model: str | None = None) -> Moderation:
        """Every text's verdict. The model is the request's, else the policy's, else the setting's."""
        name = model or self.policy.model or self.settings.moderation_model
        if name is None:
            raise InvalidRequestError(
                "no moderation model: pass model, or set one in the tenant's moderation policy or moderation_model",
                param="model",
            )
        await asyncio.to_thread(self.ctx.check_model, name)
        handle = await self.engine.resolve(name)
        if handle.info.task != "sequence-classification":
            raise InvalidRequestError(
                f"model {name} is a {handle.info.task} model; moderation needs a classification model", param="model"
            )
        result = await self.engine.classify(handle, list(texts))
        categories = {label: self.policy.category_of(label) for label in result.labels}
        if not any(categories.values()):
            raise InvalidRequestError(
                f"no label of model {name} ({', '.join(result.labels[:16])}) names a moderation category; "
                "name one in the tenant's moderation policy's label_map",
                param="model",
            )
        terms = {c: p for c in self.policy.blocked_terms if (p := self.policy.term_pattern(c)) is not None}
        verdicts = [self._verdict(text, dict(zip(result.labels, row, strict=True)), categories, terms)
                    for text, row in zip(texts, result.scores, strict=True)]  # fmt: skip
        return Moderation(name, verdicts, result.prompt_tokens)

    def _verdict(
        self,
        text: str,
        probabilities: dict[str, float],
        categories: dict[str, str | None],
        terms: dict[str, re.Pattern[str]],
    ) -> Verdict:
        scores = dict.fromkeys(CATEGORIES, 0.0)
        covered = set(terms)
        for label, category in categories.items():
            if category is not None:  # several labels of one category add up (a softmax keeps it <= 1)
                scores[category] = min(1.0, scores[category] + probabilities[label])
                covered.add(category)
        for category, pattern in terms.items():
            if pattern.search(text):
                scores[category] = 1.0
        threshold = self.policy.threshold or self.settings.moderation_threshold
        scores = {c: round(s, 6) for c, s in scores.items()}
        flagged = sorted((c for c in CATEGORIES if scores[c] >= threshold), key=lambda c: -scores[c])
        return Verdict(scores, flagged, frozenset(covered))

    async def enforce(self, stage: str, texts: Sequence[str], param: str | None) -> None:
        """Refuse (400 ``content_policy_violation``) when any text is flagged: counted in the
        metrics and written to the audit log with the categories, never the text."""
        if not texts:
            return
        moderation = await self.moderate(texts)
        self.ctx.platform.record_usage(
            tenant=self.ctx.tenant,
            key_id=self.ctx.key.id,
            model=moderation.model,
            kind="moderation",
            prompt_tokens=moderation.prompt_tokens,
            completion_tokens=0,
        )
        flagged = sorted({c for v in moderation.verdicts for c in v.flagged})
        if not flagged:
            return
        first = next(v.flagged[0] for v in moderation.verdicts if v.flagged)
        if self.settings.metrics_enabled:
            metrics.MODERATION_BLOCKED.labels(stage, first).inc()
        await asyncio.to_thread(
            self.ctx.platform.audit.record,
            "moderation.block",
            outcome="denied",
            tenant=self.ctx.tenant,
            key_id=self.ctx.key.id,
            target=moderation.model,
            detail={"stage": stage, "categories": flagged},
        )
        what = "the request's input" if stage == "input" else "the model's answer"
        raise InvalidRequestError(
            f"{what} was flagged by this tenant's moderation policy ({', '.join(flagged)})",
            param=param,
            code="content_policy_violation",
        )


async def chat_moderator(engine: EngineClient, settings: Settings, ctx: RequestContext) -> Moderator | None:
    """The caller's moderator when its tenant's policy checks chat inputs or outputs, else None."""
    moderator = await Moderator.of(engine, settings, ctx)
    policy = moderator.policy
    return moderator if policy.check_input or policy.check_output else None


async def guard_chat(moderator: Moderator, req: ChatCompletionRequest, service: ChatService) -> None:
    """What a tenant's policy asks of one chat completion: its users' messages checked now, its
    answers checked before they are returned (so not streamed: a streamed token cannot be taken back)."""
    policy = moderator.policy
    if policy.check_output and req.stream:
        raise InvalidRequestError(
            "this tenant's moderation policy checks answers before they are sent, which a stream cannot wait for: "
            "set stream to false",
            param="stream",
        )
    if policy.check_input:
        texts = [text for m in req.messages if m.role == "user" and (text := m.text()).strip()]
        await moderator.enforce("input", texts, "messages")
    if policy.check_output:

        async def check_answers(answers: list[str]) -> None:
            await moderator.enforce("output", [a for a in answers if a.strip()], None)

        service.output_check = check_answers
