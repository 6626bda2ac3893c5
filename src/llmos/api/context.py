"""Per-request accounting for inference routes: admission against the tenant's and the key's
limits, then, when the request ends, tokens charged to the limiter and a usage row written."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from llmos.api.deps import get_engine, get_platform, require
from llmos.errors import PermissionDeniedError
from llmos.platform import Platform
from llmos.security import ApiKeyInfo
from llmos.security.limits import Lease
from llmos.security.tenants import Tenant

_TENANT_TTL_S = 5.0


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


class TenantCache:
    """Tenants change rarely; a few seconds of staleness saves a query per request."""

    def __init__(self, platform: Platform) -> None:
        self._platform = platform
        self._entries: dict[str, tuple[float, Tenant]] = {}

    def get(self, tenant_id: str) -> Tenant:
        hit = self._entries.get(tenant_id)
        now = time.monotonic()
        if hit is not None and now - hit[0] < _TENANT_TTL_S:
            return hit[1]
        tenant = self._platform.tenants.get(tenant_id)
        self._entries[tenant_id] = (now, tenant)
        return tenant


def _tenant_cache(request: Request) -> TenantCache:
    cache: TenantCache | None = getattr(request.app.state, "tenant_cache", None)
    if cache is None:
        cache = request.app.state.tenant_cache = TenantCache(get_platform(request))
    return cache


def admitted(kind: str) -> Callable[..., Iterator[RequestContext]]:
    """Dependency: an authenticated (``inference`` scope), admitted request of ``kind``."""

    def dependency(
        request: Request, key: Annotated[ApiKeyInfo, Depends(require("inference"))]
    ) -> Iterator[RequestContext]:
        get_engine(request).check_capacity()  # a full engine refuses before anything else is done
        platform = get_platform(request)
        tenant = _tenant_cache(request).get(key.tenant)
        if tenant.disabled:
            raise PermissionDeniedError(f"tenant {tenant.id} is disabled", code="tenant_disabled")
        lease = platform.limiter.admit({f"tenant:{tenant.id}": tenant.limits, f"key:{key.id}": key.limits})
        ctx = RequestContext(key=key, kind=kind, lease=lease, platform=platform)
        try:
            yield ctx
        finally:
            if not ctx.handed_off:
                lease.release()  # failed before finishing (bad input, unknown model): nothing to charge

    return dependency


ChatContext = Annotated[RequestContext, Depends(admitted("chat"))]
CompletionContext = Annotated[RequestContext, Depends(admitted("completion"))]
EmbeddingContext = Annotated[RequestContext, Depends(admitted("embedding"))]
