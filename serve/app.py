"""The REST ingress (FastAPI) and its Ray Serve deployment.

Every endpoint but ``/healthz`` and ``/readyz`` needs a bearer token; the
token's tenant scopes every read. ``build_app`` gives the FastAPI app (tests
drive it directly); ``deployment`` wraps it for Ray Serve with the configured
autoscaling.
"""

from __future__ import annotations

import gzip  # noqa: F401  (GZipMiddleware answers Accept-Encoding: gzip)
import hashlib
import json
from typing import Optional

import psycopg
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import JSONResponse

from serve.auth import AuthError, Authenticator, Principal
from serve.config import ServeConfig
from serve.query import BadQuery, catalog, query_windows

__all__ = ["build_app", "deployment"]


def build_app(cfg: ServeConfig) -> FastAPI:
    app = FastAPI(title="raystream", version="1", description="Closed windows, pipelines and schemas of raystream")
    app.add_middleware(GZipMiddleware, minimum_size=1024)
    auth = Authenticator(cfg.auth.jwks_file, cfg.auth.issuer, cfg.auth.audience, cfg.auth.tenant_claim,
                         cfg.auth.hs256_secret.get_secret_value() if cfg.auth.hs256_secret else None)
    windows = catalog(cfg.specs())
    dsn = cfg.postgres_dsn.get_secret_value()
    limiter = None
    if cfg.rate_limit is not None:
        from serve.ratelimit import RateLimiter

        rl = cfg.rate_limit
        limiter = RateLimiter(rl.redis_url.get_secret_value(), rl.capacity, rl.per_second, endpoints=dict(rl.endpoints))

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
            return JSONResponse({"detail": f"request body over {cfg.max_body_bytes} bytes"}, status_code=413)
        return await call_next(request)

    def principal(request: Request, authorization: Optional[str] = Header(default=None)) -> Principal:
        try:
            who = auth.verify(authorization)
        except AuthError as exc:
            raise HTTPException(exc.status, str(exc), headers={"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)
        if limiter is not None:
            route = request.scope.get("route")
            endpoint = getattr(route, "name", None) or request.url.path
            ok, retry = limiter.check(who.tenant, endpoint)
            if not ok:
                raise HTTPException(429, f"rate limit of {endpoint} reached for this tenant", headers={"Retry-After": str(int(retry) or 1)})
        return who

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> Response:
        try:
            with psycopg.connect(dsn, connect_timeout=2) as conn:
                conn.execute("select 1")
        except psycopg.Error as exc:
            return JSONResponse({"status": "not ready", "postgres": str(exc).splitlines()[0]}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/v1/aggregates/{pipeline}/{window}", tags=["aggregates"])
    def aggregates(
        pipeline: str, window: str, request: Request,
        start: Optional[int] = Query(None, description="window_start >= start (epoch ms)"),
        end: Optional[int] = Query(None, description="window_start < end (epoch ms)"),
        order: str = Query("asc", pattern="^(asc|desc)$"),
        fields: Optional[str] = Query(None, description="comma-separated columns"),
        limit: int = Query(100, ge=1, le=cfg.max_page_size),
        cursor: Optional[str] = Query(None, max_length=4096),
        if_none_match: Optional[str] = Header(default=None),
        who: Principal = Depends(principal),
    ) -> Response:
        """Closed windows of the caller's tenant; filter on any group key with ``key=value`` query parameters."""
        info = windows.get((pipeline, window))
        if info is None:
            raise HTTPException(404, f"no window {window!r} in pipeline {pipeline!r}")
        reserved = {"start", "end", "order", "fields", "limit", "cursor"}
        filters = {k: v for k, v in request.query_params.items() if k not in reserved}
        try:
            with psycopg.connect(dsn, connect_timeout=5) as conn:
                rows, nxt = query_windows(conn, cfg.table_prefix, info, cfg.tenant_key, who.tenant, filters, start, end, order,
                                          fields.split(",") if fields else None, limit, cursor)
        except BadQuery as exc:
            raise HTTPException(exc.status, str(exc))
        except psycopg.errors.UndefinedTable:
            rows, nxt = [], None  # nothing emitted yet
        body = json.dumps({"items": rows, "next_cursor": nxt}, default=str, separators=(",", ":")).encode()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        if if_none_match and etag in [t.strip() for t in if_none_match.split(",")]:
            return Response(status_code=304, headers={"ETag": etag})
        return Response(body, media_type="application/json", headers={"ETag": etag, "Cache-Control": "private, no-cache"})

    @app.get("/v1/pipelines", tags=["pipelines"])
    def pipelines(who: Principal = Depends(principal)) -> dict:
        return {"pipelines": [{"name": s, "windows": [w for (p, w) in windows if p == s]} for s in sorted({p for p, _ in windows})]}

    @app.get("/v1/pipelines/{name}", tags=["pipelines"])
    def pipeline_status(name: str, who: Principal = Depends(principal)) -> dict:
        if name not in {p for p, _ in windows}:
            raise HTTPException(404, f"no pipeline {name!r}")
        try:
            from actors.control import pipeline_status as status

            return status(name, timeout_s=5)
        except Exception as exc:  # not running here, or Ray unreachable
            raise HTTPException(503, f"pipeline {name!r} is not running: {type(exc).__name__}")

    return app


def deployment(cfg: ServeConfig):
    """The Serve application: the FastAPI ingress with the configured autoscaling."""
    from ray import serve

    app = build_app(cfg)

    @serve.deployment(
        name="raystream-api",
        autoscaling_config={"min_replicas": cfg.autoscaling.min_replicas, "max_replicas": cfg.autoscaling.max_replicas,
                            "target_ongoing_requests": cfg.autoscaling.target_ongoing_requests},
        ray_actor_options={"num_cpus": 0.1},
    )
    @serve.ingress(app)
    class Api:
        pass

    return Api.bind()
