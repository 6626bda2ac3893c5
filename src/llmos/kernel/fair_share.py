"""How many rows of a shared decode batch each tenant may hold.

Every row in a CPU decode batch makes each step slower for all rows, so a tenant with a flood of
requests slows a tenant with one request even when the queue serves them in turn. The policy:
- a tenant alone uses the whole batch;
- while a *light* tenant (at most ``light_rows`` rows of work, running or queued) is active,
  every tenant is held to ``light_rows`` rows, which keeps the batch narrow enough that the
  light tenant's tokens come nearly as fast as when it is alone;
- when every active tenant is heavy, they share the batch equally.
The heavy tenant's extra requests wait in the queue (its own latency, not anyone else's).
"""

from __future__ import annotations


def row_caps(demand: dict[str, int], max_rows: int, light_rows: int) -> dict[str, int]:
    """Per-tenant row limits for tenants with ``demand`` rows of work (running plus queued)."""
    active = {tenant: rows for tenant, rows in demand.items() if rows > 0}
    if len(active) <= 1 or light_rows <= 0:
        return dict.fromkeys(active, max_rows)
    if any(rows <= light_rows for rows in active.values()):
        return dict.fromkeys(active, light_rows)
    return dict.fromkeys(active, max(1, max_rows // len(active)))
