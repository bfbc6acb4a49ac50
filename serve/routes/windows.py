"""``GET /v1/windows/{pipeline}/{window}``: closed windows of the caller's tenant, paged, with ETags.

``/v1/aggregates/...`` is the same route under its old name, deprecated (it
answers with a ``Deprecation`` header and will go in the next release).
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

from fastapi import APIRouter, Depends, Header, Query, Request, Response

from serve.auth import Principal
from serve.models import errors
from serve.query import MAX_MS
from serve.routes import caller

__all__ = ["RESERVED", "router"]

RESERVED = {"start", "end", "order", "fields", "limit", "cursor", "include_open"}


def router(core) -> APIRouter:
    r = APIRouter(tags=["windows"])
    responses = {304: {"description": "unchanged since the ETag in If-None-Match"}, **errors(400, 401, 403, 404, 429, 503)}

    async def windows(
        pipeline: str, window: str, request: Request,
        start: Optional[int] = Query(None, ge=0, le=MAX_MS, description="window_start >= start (epoch ms)"),
        end: Optional[int] = Query(None, ge=0, le=MAX_MS, description="window_start < end (epoch ms)"),
        order: str = Query("asc", pattern="^(asc|desc)$"),
        fields: Optional[str] = Query(None, max_length=4096, description="comma-separated columns"),
        limit: int = Query(100, ge=1, le=core.cfg.max_page_size),
        cursor: Optional[str] = Query(None, max_length=4096),
        include_open: bool = Query(False, description="also the windows still open, read live from the workers"),
        if_none_match: Optional[str] = Header(default=None),
        who: Principal = Depends(caller),
    ) -> Response:
        """Closed windows of the caller's tenant; filter on any group key with ``key=value`` query parameters."""
        filters = {k: v for k, v in request.query_params.items() if k not in RESERVED}
        result = await core.query(who, pipeline, window, filters, start, end, order, fields.split(",") if fields else None,
                                  limit, cursor, include_open)
        body = json.dumps(result, default=str, separators=(",", ":")).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
        if request.url.path.startswith("/v1/aggregates/"):
            headers["Deprecation"] = "true"
            headers["Link"] = f'</v1/windows/{pipeline}/{window}>; rel="successor-version"'
        if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
            return Response(status_code=304, headers=headers)
        return Response(body, media_type="application/json", headers=headers)

    r.add_api_route("/v1/windows/{pipeline}/{window}", windows, methods=["GET"], name="windows", responses=responses)
    r.add_api_route("/v1/aggregates/{pipeline}/{window}", windows, methods=["GET"], name="windows", responses=responses,
                    deprecated=True, summary="Windows (deprecated name: use /v1/windows)")
    return r
