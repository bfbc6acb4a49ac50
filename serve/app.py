"""The REST ingress (FastAPI) and its Ray Serve deployment.

Every endpoint but ``/healthz`` and ``/readyz`` needs a bearer token; the
token's tenant scopes every read. ``build_app`` gives the FastAPI app (tests
drive it directly); ``deployment`` wraps it for Ray Serve with the configured
autoscaling.
"""

from __future__ import annotations

import hashlib
import json
from typing import Optional

import psycopg
from pydantic import BaseModel, Field
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse

from serve.auth import Principal
from serve.config import ServeConfig
from serve.core import ApiError, Core, shared_core

_BEARER = HTTPBearer(auto_error=False, description="JWT (RS256/ES256) whose tenant claim scopes the request")


class ScaleRequest(BaseModel):
    """``POST /v1/pipelines/{name}/scale``."""

    workers: int = Field(ge=1, le=256, description="worker actors after the change")


class Problem(BaseModel):
    """Every error response: what went wrong, for a person to read."""

    detail: str


def _errors(*codes: int) -> dict:
    what = {400: "a filter, field, cursor or body this API does not accept", 401: "no token, or an invalid or expired one",
            403: "the token may not do this (another tenant, a missing scope)", 404: "no such pipeline, window or schema",
            409: "incompatible schema", 413: "request body or record count over the limit",
            429: "rate limit of the tenant and endpoint reached (see Retry-After)", 503: "a store or the pipeline is unavailable"}
    return {c: {"model": Problem, "description": what[c]} for c in codes}

__all__ = ["build_app", "deployment"]


class BodyLimit:
    """413 for a declared Content-Length over the limit, before the body is read.

    Plain ASGI on purpose: an ``@app.middleware("http")`` wrapper watches the request stream for
    disconnects, which under Serve costs a call back to the proxy on every request.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for k, v in scope.get("headers", ()):
                if k == b"content-length" and (not v.isdigit() or int(v) > self.limit):
                    await JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)(scope, receive, send)
                    return
        await self.app(scope, receive, send)


def build_app(cfg: ServeConfig, core: Core | None = None) -> FastAPI:
    """The FastAPI app over ``core`` (a new one for ``cfg`` when not given)."""
    core = core or Core(cfg)
    app = FastAPI(title="raystream", version="1", description="Closed windows, pipelines and schemas of raystream")
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    app.state.core = core
    windows = core.windows
    dsn = core.dsn

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(int(exc.retry_after))
        return JSONResponse({"detail": str(exc)}, status_code=exc.status, headers=headers)

    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)

    async def principal(request: Request, creds: Optional[HTTPAuthorizationCredentials] = Security(_BEARER)) -> Principal:
        who = core.principal(f"Bearer {creds.credentials}" if creds is not None else None)
        route = request.scope.get("route")
        await core.admit(who, getattr(route, "name", None) or request.url.path)
        return who

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], responses={503: {"description": "PostgreSQL is not reachable"}})
    async def readyz() -> Response:
        try:
            pool = await core.apg()
            async with pool.connection(timeout=2) as conn:
                await conn.execute("select 1")
        except (psycopg.Error, TimeoutError) as exc:
            return JSONResponse({"status": "not ready", "postgres": (str(exc).splitlines() or [type(exc).__name__])[0]},
                                status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/v1/aggregates/{pipeline}/{window}", tags=["aggregates"], responses={304: {"description": "unchanged since the ETag in If-None-Match"},
                                                                                  **_errors(400, 401, 403, 404, 429, 503)})
    async def aggregates(
        pipeline: str, window: str, request: Request,
        start: Optional[int] = Query(None, description="window_start >= start (epoch ms)"),
        end: Optional[int] = Query(None, description="window_start < end (epoch ms)"),
        order: str = Query("asc", pattern="^(asc|desc)$"),
        fields: Optional[str] = Query(None, description="comma-separated columns"),
        limit: int = Query(100, ge=1, le=cfg.max_page_size),
        cursor: Optional[str] = Query(None, max_length=4096),
        include_open: bool = Query(False, description="also the windows still open, read live from the workers"),
        if_none_match: Optional[str] = Header(default=None),
        who: Principal = Depends(principal),
    ) -> Response:
        """Closed windows of the caller's tenant; filter on any group key with ``key=value`` query parameters."""
        reserved = {"start", "end", "order", "fields", "limit", "cursor", "include_open"}
        filters = {k: v for k, v in request.query_params.items() if k not in reserved}
        result = await core.query(who, pipeline, window, filters, start, end, order, fields.split(",") if fields else None,
                                  limit, cursor, include_open)
        body = json.dumps(result, default=str, separators=(",", ":")).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
            return Response(status_code=304, headers={"ETag": etag})
        return Response(body, media_type="application/json", headers={"ETag": etag, "Cache-Control": "private, no-cache"})

    @app.get("/v1/pipelines", tags=["pipelines"], responses=_errors(401, 403, 429))
    def pipelines(who: Principal = Depends(principal)) -> dict:
        return {"pipelines": [{"name": s, "windows": [w for (p, w) in windows if p == s]} for s in sorted({p for p, _ in windows})]}

    @app.get("/v1/pipelines/{name}", tags=["pipelines"], responses=_errors(401, 403, 404, 429, 503))
    def pipeline_status(name: str, who: Principal = Depends(principal)) -> dict:
        if name not in {p for p, _ in windows}:
            raise HTTPException(404, f"no pipeline {name!r}")
        try:
            from actors.control import pipeline_status as status

            return status(name, timeout_s=5)
        except Exception as exc:  # not running here, or Ray unreachable
            raise HTTPException(503, f"pipeline {name!r} is not running: {type(exc).__name__}")

    @app.post("/v1/pipelines/{name}/scale", tags=["pipelines"], responses=_errors(400, 401, 403, 404, 429, 503))
    def scale_pipeline(name: str, body: ScaleRequest, who: Principal = Depends(principal)) -> dict:
        """Move the running pipeline's partitions (with their state) onto ``workers`` workers (scope ``pipelines:write``);
        the change is written to the audit table with the caller."""
        if "pipelines:write" not in who.scopes:
            raise HTTPException(403, "changing pipelines needs the pipelines:write scope")
        if name not in {p for p, _ in windows}:
            raise HTTPException(404, f"no pipeline {name!r}")
        from actors import control

        try:
            before = len(control.pipeline_status(name, timeout_s=5)["workers"])
        except Exception as exc:  # not running here, or Ray unreachable
            raise HTTPException(503, f"pipeline {name!r} is not running: {type(exc).__name__}")
        try:
            plan = control.scale(name, body.workers)
        except Exception as exc:  # no checkpoint section, not enough CPUs, not running
            cause = getattr(exc, "cause", None) or exc
            raise HTTPException(503, f"cannot scale {name!r}: {cause}")
        core.registry.record(f"api:{who.subject}@{who.tenant}", "scale_pipeline", name,
                             {"from": before, "to": body.workers})
        return {"pipeline": name, "from": before, "to": body.workers, "plan": plan}

    # -- schemas ---------------------------------------------------------------
    from pipeline.io.registry import Incompatible, UnknownVersion
    from pipeline.schemas import Schema

    registry = core.registry

    @app.get("/v1/schemas", tags=["schemas"], responses=_errors(401, 403, 429))
    def subjects(who: Principal = Depends(principal)) -> dict:
        return {"subjects": [{**s, "latest": s["latest"]} for s in registry.subjects()]}

    @app.get("/v1/schemas/{subject}/versions/{version}", tags=["schemas"], responses=_errors(400, 401, 403, 404, 429))
    def schema_version(subject: str, version: str, who: Principal = Depends(principal)) -> dict:
        if version != "latest" and not version.isdigit():
            raise HTTPException(400, "version is a number or 'latest'")
        try:
            v, schema = registry.get(subject, version)
        except UnknownVersion as exc:
            raise HTTPException(404, str(exc))
        return {"subject": subject, "version": v, "type": schema.kind, "schema": schema.doc if schema.kind == "json" else schema.text,
                "message": schema.message}

    @app.post("/v1/schemas/{subject}", tags=["schemas"], status_code=201, responses=_errors(400, 401, 403, 409, 413, 429))
    def register_schema(subject: str, body: dict, who: Principal = Depends(principal)) -> dict:
        """Register a version (needs the ``schemas:write`` scope); 409 with the problems when incompatible."""
        if "schemas:write" not in who.scopes:
            raise HTTPException(403, "registering schemas needs the schemas:write scope")
        kind = body.get("type", "json")
        try:
            text = json.dumps(body["schema"]) if kind == "json" else str(body["schema"])
            schema = Schema(kind, text, body.get("message"))
            version = registry.register(subject, schema, actor=f"api:{who.subject}@{who.tenant}")
        except Incompatible as exc:
            return JSONResponse({"detail": str(exc), "problems": exc.problems, "compatibility": exc.mode}, status_code=409)
        except (KeyError, ValueError) as exc:
            raise HTTPException(400, f"bad schema: {exc}")
        return {"subject": subject, "version": version}

    if core.ingestor is not None:
        _ingest_routes(app, core, principal)
    if cfg.stream is not None:
        from serve.stream import add_stream_route

        add_stream_route(app, core)
    app.router.on_shutdown.append(core.close)
    return app


def _ingest_routes(app: FastAPI, core: Core, principal) -> None:
    """POST /v1/events: JSON array or NDJSON; each record validated, tenant-checked, produced keyed by tenant."""
    ing = core.ingestor

    @app.post("/v1/events", tags=["ingest"], responses={
        207: {"description": "some records accepted, the others rejected with their reasons"},
        422: {"description": "no record accepted (each with its reason), or a body FastAPI could not read"},
        **_errors(400, 401, 403, 413, 429)}, openapi_extra={"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"oneOf": [{"type": "array", "items": {"type": "object"}}, {"type": "object"}]}},
            "application/x-ndjson": {"schema": {"type": "string"}}}}})
    async def ingest(request: Request, who: Principal = Depends(principal)) -> Response:
        """Ingest a JSON array, one JSON object or NDJSON; 200 all accepted, 207 some, 422 none (per-record reasons)."""
        raw = await request.body()
        if len(raw) > core.cfg.max_body_bytes:  # chunked bodies carry no Content-Length
            raise ApiError(413, f"request body over {core.cfg.max_body_bytes} bytes")
        ctype = request.headers.get("content-type", "")
        try:
            if "ndjson" in ctype or "jsonlines" in ctype:
                records = [json.loads(line) for line in raw.splitlines() if line.strip()]
            else:
                records = json.loads(raw)
                if isinstance(records, dict):
                    records = [records]
        except ValueError as exc:
            raise HTTPException(400, f"body is not JSON or NDJSON: {exc}")
        if not isinstance(records, list):
            raise HTTPException(400, "body is a JSON array of records, one record, or NDJSON")
        if len(records) > ing.cfg.max_records:
            raise HTTPException(413, f"more than {ing.cfg.max_records} records")
        results, _label = await ing.ingest(records, who.tenant)
        accepted = sum(1 for r in results if r["status"] == "accepted")
        status = 200 if accepted == len(results) else 207 if accepted else 422
        return JSONResponse({"accepted": accepted, "rejected": len(results) - accepted, "results": results}, status_code=status)


def start_direct(app: FastAPI, host: str, port: int):
    """Serve ``app`` from this process on ``port`` too (``direct_port``), on its own event loop in a thread.

    Serve's proxy relays every request and every WebSocket message to the replica
    over Ray; here the replica answers the socket itself. The port is bound with
    SO_REUSEPORT so every replica on a node listens on it and the kernel spreads
    connections. The app shares the replica's Core (its pools are per event loop).
    """
    import asyncio
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    # lifespan off: shutting this server down must not close the Core the Serve app still uses
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws_max_size=1 << 16))
    import gc

    # what exists now (Ray, Serve, the app) lives as long as the replica: keep it out of every collection
    gc.freeze()
    t = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), name="raystream-direct", daemon=True)
    t.start()
    return server


def deployment(cfg: ServeConfig):
    """The Serve application: the FastAPI ingress plus the gRPC methods, with the configured autoscaling."""
    from ray import serve

    from serve.grpc_api import GrpcMethods

    def replica_app() -> FastAPI:
        # a builder is evaluated in each replica: the app and the gRPC methods share the replica's Core
        return build_app(cfg, shared_core(cfg))

    @serve.deployment(
        name="raystream-api",
        autoscaling_config={"min_replicas": cfg.autoscaling.min_replicas, "max_replicas": cfg.autoscaling.max_replicas,
                            "target_ongoing_requests": cfg.autoscaling.target_ongoing_requests},
        ray_actor_options={"num_cpus": 0.1},
        # handlers are async and mostly wait on PostgreSQL/Redis, and every open subscription is one
        max_ongoing_requests=cfg.autoscaling.max_ongoing_requests,
    )
    @serve.ingress(replica_app)
    class Api(GrpcMethods):
        """The FastAPI app (HTTP, WebSocket) and the gRPC service, one instance per Serve replica."""

        def __init__(self):
            GrpcMethods.__init__(self, shared_core(cfg))
            if cfg.direct_port is not None:
                start_direct(build_app(cfg, self.core), cfg.host, cfg.direct_port)

    return Api.bind()
