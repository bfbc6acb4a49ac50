"""``POST /v1/events``: a JSON array, one JSON object or NDJSON; every record gets its own verdict."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serve.auth import Principal
from serve.errors import ApiError
from serve.models import errors
from serve.routes import caller, known_query

__all__ = ["router"]


def router(core) -> APIRouter:
    r = APIRouter(tags=["ingest"], dependencies=[Depends(known_query)])
    ing = core.ingestor

    @r.post("/v1/events", responses={
        207: {"description": "some records accepted, the others rejected with their reasons"},
        422: {"description": "no record accepted (each with its reason)"},
        **errors(400, 401, 403, 413, 429, 503)}, openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"oneOf": [{"type": "array", "items": {"type": "object"}}, {"type": "object"}]}},
            "application/x-ndjson": {"schema": {"type": "string"}}}}})
    async def ingest(request: Request, who: Principal = Depends(caller)) -> JSONResponse:
        """Ingest a JSON array, one JSON object or NDJSON; 200 all accepted, 207 some, 422 none (per-record reasons);
        503 with Retry-After while the producer's queue is full (nothing of the request was sent)."""
        raw = await request.body()  # bounded by the Guard while it is read
        ctype = request.headers.get("content-type", "")
        try:
            if "ndjson" in ctype or "jsonlines" in ctype:
                records = [json.loads(line) for line in raw.splitlines() if line.strip()]
            else:
                records = json.loads(raw)
                if isinstance(records, dict):
                    records = [records]
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, f"body is not JSON or NDJSON: {type(exc).__name__}", parameter="body") from None
        if not isinstance(records, list):
            raise ApiError(400, "body is a JSON array of records, one record, or NDJSON", parameter="body")
        if len(records) > ing.cfg.max_records:
            raise ApiError(413, f"more than {ing.cfg.max_records} records")
        results, _label = await ing.ingest(records, who.tenant)
        accepted = sum(1 for x in results if x["status"] == "accepted")
        status = 200 if accepted == len(results) else 207 if accepted else 422
        return JSONResponse({"accepted": accepted, "rejected": len(results) - accepted, "results": results}, status_code=status)

    return r
