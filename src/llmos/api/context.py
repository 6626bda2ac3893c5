"""Per-request admission against the tenant's and the key's limits (requests per minute,
concurrent requests) for every tenant route, and for inference routes the accounting too: when
the request ends, tokens charged to the limiter and a usage row written."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Annotated

from fastapi import Depends, Request

from llmos.api.deps import get_engine, get_platform, require
from llmos.platform import Platform
from llmos.security import ApiKeyInfo
from llmos.security.limits import Lease


@dataclass
class RequestContext:
    key: ApiKeyInfo
    kind: str
    lease: Lease
    platform: Platform
    handed_off: bool = False
    """Set when a streaming response takes over: the stream, not the route, calls ``finish``."""

    @property
    def tenant(self) -> str:
        return self.key.tenant

    def check_model(self, model: str) -> None:
        """404 unless the model is a shared base model or the caller's tenant's own (admins see all)."""
        self.platform.registry.get(model, tenant=None if "admin" in self.key.scopes else self.key.tenant)

    def route_model(self, model: str, user: str | None = None) -> str:
        """The model reference this request goes on with: ``model`` checked as by ``check_model``,
        then for ``name@alias`` the version the alias sends this end user to (``user``, else the
        tenant: ``ModelAliases.route``) as ``name@N``, so the response, its usage and its metrics
        name the version that answered."""
        self.check_model(model)
        return self.platform.registry.aliases.route(model, tenant=self.tenant, user=user)

    def finish(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Charge what the request used; safe to call more than once (only the first counts)."""
        if self.lease.released:
            return
        self.lease.release(prompt_tokens + completion_tokens)
        self.platform.record_usage(
            tenant=self.key.tenant,
            key_id=self.key.id,
            model=model,
            kind=self.kind,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )


def admit(request: Request, key: ApiKeyInfo, *, counts_tokens: bool = True) -> Lease:
    """Admit one request of ``key`` against its tenant's and its own limits, or raise 429.
    ``counts_tokens`` False: a request that generates no tokens (files, fine-tuning) is not
    refused because the tenant spent its tokens per minute."""
    platform = get_platform(request)
    tenant = platform.tenants.current(key.tenant)
    subjects = {f"tenant:{tenant.id}": tenant.limits, f"key:{key.id}": key.limits}
    if not counts_tokens:
        subjects = {subject: replace(limits, tokens_per_minute=None) for subject, limits in subjects.items()}
    return platform.limiter.admit(subjects)


def limited(scope: str) -> Callable[..., Iterator[ApiKeyInfo]]:
    """Dependency: an authenticated key with ``scope``, admitted against its limits for as long
    as the request runs (files and fine-tuning routes)."""

    # A default, not an ``Annotated`` hint: FastAPI evaluates string annotations in the module's
    # globals, where ``scope`` does not exist.
    authenticated = Depends(require(scope))

    def dependency(request: Request, key: ApiKeyInfo = authenticated) -> Iterator[ApiKeyInfo]:
        lease = admit(request, key, counts_tokens=False)
        try:
            yield key
        finally:
            lease.release()

    return dependency


def admitted(kind: str) -> Callable[..., Iterator[RequestContext]]:
    """Dependency: an authenticated (``inference`` scope), admitted request of ``kind``."""

    def dependency(
        request: Request, key: Annotated[ApiKeyInfo, Depends(require("inference"))]
    ) -> Iterator[RequestContext]:
        get_engine(request).check_capacity()  # a full engine refuses before anything else is done
        lease = admit(request, key)
        ctx = RequestContext(key=key, kind=kind, lease=lease, platform=get_platform(request))
        try:
            yield ctx
        finally:
            if not ctx.handed_off:
                lease.release()  # failed before finishing (bad input, unknown model): nothing to charge

    return dependency


ChatContext = Annotated[RequestContext, Depends(admitted("chat"))]
CompletionContext = Annotated[RequestContext, Depends(admitted("completion"))]
EmbeddingContext = Annotated[RequestContext, Depends(admitted("embedding"))]
