"""``/v1/schemas``: the schema registry (reads for every tenant, registration with ``schemas:write``)."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Path
from fastapi.responses import JSONResponse

from serve.auth import Principal
from serve.errors import ApiError
from serve.models import SchemaRequest, errors
from serve.routes import caller, known_query

__all__ = ["router"]

SUBJECT = Path(..., min_length=1, max_length=255, pattern=r"^[^\x00-\x1f]+$", description="registry subject")


def router(core) -> APIRouter:
    from pipeline.io.registry import Incompatible, UnknownVersion
    from pipeline.schemas import Schema

    r = APIRouter(tags=["schemas"], dependencies=[Depends(known_query)])
    registry = core.registry

    @r.get("/v1/schemas", responses=errors(400, 401, 403, 429))
    async def subjects(who: Principal = Depends(caller)) -> dict:
        return {"subjects": await asyncio.to_thread(registry.subjects)}

    @r.get("/v1/schemas/{subject}/versions/{version}", responses=errors(400, 401, 403, 404, 429), operation_id="schema_version")
    async def schema_version(version: str, subject: str = SUBJECT, who: Principal = Depends(caller)) -> dict:
        if version != "latest" and not (version.isdigit() and 0 < int(version) < 2**31):
            raise ApiError(400, "version is a positive number or 'latest'", parameter="version")
        try:
            v, schema = await asyncio.to_thread(registry.get, subject, version)
        except UnknownVersion as exc:
            raise ApiError(404, str(exc)) from None
        return {"subject": subject, "version": v, "type": schema.kind, "schema": schema.doc if schema.kind == "json" else schema.text,
                "message": schema.message}

    registered = {201: {"description": "registered (or already this version)", "links": {"ReadRegistered": {
        "operationId": "schema_version", "description": "the version just registered",
        "parameters": {"subject": "$request.path.subject", "version": "$response.body#/version"}}}}}

    @r.post("/v1/schemas/{subject}", status_code=201, responses={**registered, **errors(400, 401, 403, 409, 413, 429)})
    async def register_schema(body: SchemaRequest, subject: str = SUBJECT, who: Principal = Depends(caller)) -> JSONResponse:
        """Register a version (needs the ``schemas:write`` scope); 409 with the problems when incompatible."""
        actor = f"api:{who.subject}@{who.tenant}"
        if "schemas:write" not in who.scopes:
            await asyncio.to_thread(registry.record, actor, "register_denied", subject, {})
            raise ApiError(403, "registering schemas needs the schemas:write scope")
        if (body.type == "json") != isinstance(body.schema_, dict):
            raise ApiError(400, "a json schema is an object; a protobuf schema is a base64 string", parameter="schema")
        try:
            text = json.dumps(body.schema_) if body.type == "json" else body.schema_
            schema = Schema(body.type, text, body.message)
            version = await asyncio.to_thread(registry.register, subject, schema, actor)
        except Incompatible as exc:
            return JSONResponse({"detail": str(exc), "problems": exc.problems, "compatibility": exc.mode}, status_code=409)
        except (KeyError, ValueError) as exc:
            raise ApiError(400, f"bad schema: {exc}", parameter="schema") from None
        return JSONResponse({"subject": subject, "version": version}, status_code=201)

    return r
