"""REST routers, one per area (health, windows, pipelines, schemas, ingest); ``serve.app`` puts them together."""

from __future__ import annotations

from typing import Optional

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from serve.auth import Principal
from serve.errors import ApiError

__all__ = ["caller"]

_BEARER = HTTPBearer(auto_error=False, description="JWT (RS256/ES256) whose tenant claim scopes the request")


async def caller(request: Request, _creds: Optional[HTTPAuthorizationCredentials] = Security(_BEARER)) -> Principal:
    """The principal the Guard verified before the body was read (``_creds`` only documents the scheme)."""
    who = request.scope.get("state", {}).get("principal")
    if who is None:  # a route outside the Guard's prefix cannot ask for a caller
        raise ApiError(401, "missing bearer token")
    return who
