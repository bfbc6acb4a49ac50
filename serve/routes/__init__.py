"""REST routers, one per area (health, windows, pipelines, schemas, ingest); ``serve.app`` puts them together."""

from __future__ import annotations

from typing import Optional

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve.auth import Principal
from serve.errors import ApiError

__all__ = ["caller", "known_query"]

_BEARER = HTTPBearer(auto_error=False, description="JWT (RS256/ES256) whose tenant claim scopes the request")


async def caller(request: Request, _creds: Optional[HTTPAuthorizationCredentials] = Security(_BEARER)) -> Principal:
    """The principal the Guard verified before the body was read (``_creds`` only documents the scheme)."""
    who = request.scope.get("state", {}).get("principal")
    if who is None:  # a route outside the Guard's prefix cannot ask for a caller
        raise ApiError(401, "missing bearer token")
    return who


async def known_query(request: Request) -> None:
    """400 naming the first query parameter the route does not declare (routes whose extra parameters mean
    something, like the windows route's filters, do not use this)."""
    from fastapi.dependencies.utils import get_flat_params

    route = request.scope.get("route")
    if route is None or not hasattr(route, "dependant"):
        return
    declared = {p.alias for p in get_flat_params(route.dependant) if p.field_info.__class__.__name__ == "Query"}
    extra = [k for k in request.query_params if k not in declared]
    if extra:
        raise ApiError(400, f"unknown query parameter {extra[0]!r}", parameter=extra[0])
