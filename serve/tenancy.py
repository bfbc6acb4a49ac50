"""Which rows and facts a caller may see: the one tenancy rule of every API (pure).

A token names one tenant (a non-empty string claim). A row is visible to it
when the row's tenant key holds exactly that string: values are compared as
typed values, so a null tenant, the number 7 or the string ``"None"`` never
match a token whose tenant is ``"None"`` or ``"7"``. REST, WebSocket, gRPC,
``include_open`` and the SQL of closed windows all go through here (the SQL
binds the tenant as a text parameter against the tenant column, the same
typed comparison).

Pipeline status is operator information: a caller with the ``operator`` scope
sees all of it; a tenant sees a redacted summary (phase, health counts, last
checkpoint time) with no tracebacks, partitions, offsets, pids or events.
"""

from __future__ import annotations

from typing import Any, Iterable

from serve.auth import Principal
from serve.errors import ApiError

__all__ = ["OPERATOR_SCOPE", "can_see", "pipeline_view", "scope_filters", "tenant_of", "visible_rows"]

OPERATOR_SCOPE = "operator"


def tenant_of(row: dict, tenant_key: str) -> str | None:
    """The row's tenant when it is a string, else None (a row no token can see)."""
    v = row.get(tenant_key)
    return v if isinstance(v, str) else None


def can_see(who: Principal, row: dict, tenant_key: str) -> bool:
    return bool(who.tenant) and tenant_of(row, tenant_key) == who.tenant


def visible_rows(who: Principal, rows: Iterable[dict], tenant_key: str) -> list[dict]:
    return [r for r in rows if can_see(who, r, tenant_key)]


def scope_filters(who: Principal, filters: dict[str, Any], tenant_key: str, allowed: Iterable[str]) -> dict[str, Any]:
    """The caller's filters with its tenant pinned: 400 for a column that is not a filter, 403 for another tenant."""
    allowed = set(allowed)
    bad = sorted(str(k) for k in filters if k not in allowed)
    if bad:
        raise ApiError(400, f"cannot filter on {bad}; allowed: {sorted(allowed)}", parameter=bad[0])
    if tenant_key in filters and filters[tenant_key] != who.tenant:
        raise ApiError(403, "a token may only read its own tenant", parameter=tenant_key)
    return {**filters, tenant_key: who.tenant}


def pipeline_view(who: Principal, status: dict) -> dict:
    """What ``who`` may see of a pipeline's status."""
    if OPERATOR_SCOPE in who.scopes:
        return status
    workers = status.get("workers") or []
    last = status.get("last_checkpoint") or {}
    return {
        "pipeline": status.get("pipeline"),
        "phase": status.get("phase"),
        "degraded": bool(status.get("degraded")),
        "workers": len(workers),
        "healthy_workers": sum(1 for w in workers if w.get("health") in ("running", "idle", "drained", "finished")),
        "last_checkpoint": {k: last[k] for k in ("id", "created") if k in last} or None,
    }
